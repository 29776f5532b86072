# Bulkhead. The README's two commands are `make demo` and `make test`; each
# installs what it needs (Go through the module proxy, Debian packages via
# apt-get) when it is missing.

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)
# go.mod names the Go release; an older installed go fetches it from the
# module proxy instead of failing.
export GOTOOLCHAIN ?= auto

VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/bulkhead-edge/bulkhead/internal/version.Version=$(VERSION)
# The agent leaves HTTP/2 out of net/http: it holds one HTTP/1.1 long-poll
# (lab.AgentTags says why, for the binaries tests build).
AGENT_TAGS := nethttpomithttp2
# Static binaries: no libc to find on the device, and 1.4 MiB less resident.
GOBUILD := CGO_ENABLED=0 go build -trimpath -ldflags '$(LDFLAGS)'
# An execution count, not a duration: Go 1.26's fuzz coordinator can report
# its own -fuzztime deadline as a failure (go.dev/issue/75804, fixed in 1.27).
# 100000 runs is about 10 s of the slowest target (FuzzValidate) here.
FUZZTIME ?= 100000x
# What the kernel-facing tests drive or read back with.
TEST_DEBS := iproute2 nftables wireguard-tools wireguard-go iperf3 curl gpsd systemd util-linux postgresql

# The pure packages (decision core, formats, caches) whose tests run for
# ARM under qemu-user in `make cross-test`. TestGatherReadsThisHost is
# skipped there: under qemu-user a process's executable is qemu itself.
CROSS_TEST_PKGS := ./localpolicy ./localpolicy/admit ./localpolicy/policy ./localpolicy/bundle ./localpolicy/command \
	./localpolicy/opskey ./internal/strictjson ./localpolicy/trustedtime ./localpolicy/store \
	./agent/spool ./cmd/bulkhead/cli ./control/suggest ./posture ./posture/gpsd

.PHONY: all build test lint fuzz bench bench-scale demo deps go clean cross cross-test deb

all: build

go:
	@.ci/ensure-go

deps: go
	@go mod download

build: deps
	@mkdir -p bin
	$(GOBUILD) -tags '$(AGENT_TAGS)' -o bin/bulkhead ./cmd/bulkhead
	$(GOBUILD) -o bin/bulkhead-control ./cmd/bulkhead-control
	@ls -l bin/bulkhead bin/bulkhead-control

test: deps
	@.ci/ensure-debs $(TEST_DEBS)
	go test -count=1 ./...

# go.mod and go.sum must be what `go mod tidy` makes of the imports: a
# module used directly but marked indirect (or one no longer used) fails.
lint: deps
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change:"; echo "$$unformatted"; exit 1; fi
	go vet ./...
	@go mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit the result"; exit 1; }

# A short run of every fuzz target, seeded from examples/. Minimisation is
# off: on large seeds it stalls the engine for a minute per new input.
fuzz: deps
	go test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./localpolicy/policy
	go test -run '^$$' -fuzz '^FuzzValidate$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./localpolicy/policy
	go test -run '^$$' -fuzz '^FuzzPortRange$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./localpolicy/policy
	go test -run '^$$' -fuzz '^FuzzVerify$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./localpolicy/bundle
	go test -run '^$$' -fuzz '^FuzzVerify$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./localpolicy/command
	go test -run '^$$' -fuzz '^FuzzEnrollRequest$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./control/server
	go test -run '^$$' -fuzz '^FuzzSyncRequest$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./control/server
	go test -run '^$$' -fuzz '^FuzzReportRequest$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./control/server
	go test -run '^$$' -fuzz '^FuzzSyncResponse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 0 ./api/controlapi

bench: deps
	@.ci/ensure-debs $(TEST_DEBS)
	go run ./bench/cmd/bulkhead-bench -out bench/RESULTS.md

# The replicated fan-out with 100,000 held polls (not in CI: it takes this
# 2-core machine for about half an hour and 16 GB); prints, leaves
# RESULTS.md. docs/control.md says how to profile it.
bench-scale: deps
	@.ci/ensure-debs $(TEST_DEBS)
	go run ./bench/cmd/bulkhead-bench -run 'order fan-out' -crowd 100000

# Static, stripped, reproducible agents for every target into dist/, each
# built a second time from an empty build cache and compared; fails over
# the arm64 size budget (cross/).
cross: deps
	go run ./cross/cmd/bulkhead-cross -out dist -version $(VERSION) -check

# Debian packages for amd64, arm64 and armhf from dist/, each read back with
# dpkg-deb, its unit verified by systemd-analyze and its binary run (under
# qemu-user for ARM). The packager is a module of its own (cross/deb).
deb: cross
	@.ci/ensure-debs dpkg systemd qemu-user-static
	cd cross/deb && go vet . && go test -count=1 . && \
		SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct) go run . -dist ../../dist -license ../../LICENSE -version $(VERSION)

cross-test: deps
	@.ci/ensure-debs qemu-user-static
	GOARCH=arm64 CGO_ENABLED=0 go test -count=1 -exec qemu-aarch64-static -skip TestGatherReadsThisHost $(CROSS_TEST_PKGS)
	GOARCH=arm GOARM=7 CGO_ENABLED=0 go test -count=1 -exec qemu-arm-static -skip TestGatherReadsThisHost $(CROSS_TEST_PKGS)

# A whole logistics site in network namespaces, the article's seven
# scenarios run against it (bulkhead-lab demo --help). Root.
demo: build
	@.ci/ensure-debs $(TEST_DEBS)
	$(GOBUILD) -o bin/bulkhead-lab ./cmd/bulkhead-lab
	bin/bulkhead-lab demo --bin bin $(DEMO_FLAGS)

clean:
	rm -rf bin dist
