module github.com/bulkhead-edge/bulkhead

go 1.26

require (
	github.com/go-json-experiment/json v1.27.2
	github.com/google/go-cmp v0.7.0
	github.com/secure-systems-lab/go-securesystemslib v0.11.1
	go.etcd.io/bbolt v1.5.0
)

require (
	golang.org/x/crypto v0.55.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
