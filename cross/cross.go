// Package cross owns how the agent is built for the devices it runs on:
// the targets (amd64 gateways, arm64 and 32-bit ARM scanners, MIPS
// routers), the flags that make each build static, stripped and
// reproducible, and the size budget. `make cross` builds them all into
// dist/ (cmd/bulkhead-cross); `make cross-test` runs the pure packages'
// tests for ARM under qemu-user.
package cross

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
)

// Target is one platform the agent ships for.
type Target struct {
	Name string // as in dist/bulkhead-NAME
	Env  []string
}

// Targets are the platforms, in table order.
var Targets = []Target{
	{"linux-amd64", []string{"GOOS=linux", "GOARCH=amd64"}},
	{"linux-arm64", []string{"GOOS=linux", "GOARCH=arm64"}},
	{"linux-armv7", []string{"GOOS=linux", "GOARCH=arm", "GOARM=7"}},
	{"linux-armv6", []string{"GOOS=linux", "GOARCH=arm", "GOARM=6"}},
	{"linux-mipsle", []string{"GOOS=linux", "GOARCH=mipsle", "GOMIPS=softfloat"}},
}

// Budget is the most the arm64 agent may weigh: scanners and in-cab
// boxes have little flash, and an agent that grows past it crowds out
// what the device is for. (tailscaled 1.103, built the same way, is 26.5
// MiB.)
const (
	BudgetTarget = "linux-arm64"
	Budget       = 10 << 20
)

// AgentTags are the agent's build tags. nethttpomithttp2 leaves HTTP/2 out
// of net/http: the agent's one HTTP client holds a single HTTP/1.1
// long-poll to its control server, and the 350 KB of HTTP/2 code would be
// resident in every agent for nothing. The Makefile's AGENT_TAGS is the
// same.
const AgentTags = "nethttpomithttp2"

// Agent is the agent's main package.
const Agent = "github.com/bulkhead-edge/bulkhead/cmd/bulkhead"

// Control is the control server's main package, built for the servers it
// runs on (ControlTargets) and packaged beside the agent.
const Control = "github.com/bulkhead-edge/bulkhead/cmd/bulkhead-control"

// ControlTargets are the platforms control ships for.
var ControlTargets = Targets[:2]

// Build builds the agent for t into out and returns its size and SHA-256.
// The build is static (no cgo), stripped, free of local paths
// (-trimpath) and carries an empty build id, so the same source, version
// and Go release give the same bytes on any machine.
// Extra environment (a fresh GOCACHE) is added last.
func Build(t Target, version, out string, extra ...string) (size int64, sum string, err error) {
	return BuildMain(t, Agent, AgentTags, version, out, extra...)
}

// BuildMain builds main package pkg with tags as Build builds the agent.
func BuildMain(t Target, pkg, tags, version, out string, extra ...string) (size int64, sum string, err error) {
	ldflags := "-s -w -buildid= -X github.com/bulkhead-edge/bulkhead/internal/version.Version=" + version
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-tags", tags, "-ldflags", ldflags, "-o", out, pkg)
	cmd.Env = append(append(append(os.Environ(), "CGO_ENABLED=0"), t.Env...), extra...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return 0, "", fmt.Errorf("build %s: %v\n%s", t.Name, err, stderr.String())
	}
	return digest(out)
}

func digest(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", err
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}

// Output is where `make cross` puts t's agent.
func Output(dir string, t Target) string { return filepath.Join(dir, "bulkhead-"+t.Name) }

// ControlOutput is where `make cross` puts t's control server.
func ControlOutput(dir string, t Target) string {
	return filepath.Join(dir, "bulkhead-control-"+t.Name)
}

// MiB is a size in MiB.
func MiB(n int64) float64 { return float64(n) / (1 << 20) }
