// Package lab builds test sites out of Linux network namespaces: hosts
// joined by veth pairs, processes started inside them, reachability probes
// between them, and a teardown that runs even when a test fails. End-to-end
// tests, benchmarks and `make demo` share it.
package lab

import (
	"os"
	"os/exec"
)

// RequireEnv is the variable CI sets so that privileged tests fail instead
// of skipping when the machine cannot run them.
const RequireEnv = "BULKHEAD_REQUIRE_PRIVILEGED"

// RequirePrivileged skips t unless it runs as root with the tools named
// (ip and nft, say) on PATH. With BULKHEAD_REQUIRE_PRIVILEGED=1 a missing
// prerequisite fails the test instead, so CI cannot pass by skipping.
func RequirePrivileged(t T, tools ...string) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root (network namespaces and nftables)"
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil && why == "" {
			why = "needs " + tool + " on PATH"
		}
	}
	if why == "" {
		return
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s, and %s=1 forbids skipping", why, RequireEnv)
	}
	t.Skip(why)
}
