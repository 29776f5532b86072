// Command bulkhead-cross is `make cross`: it builds the agent for every
// target and the control server for its own into dist/, writes
// dist/SHA256SUMS and what the packages ship besides (the agent's and
// control's systemd units, control's environment file), enforces the
// agent's size budget and,
// with -check, builds everything a second time from an empty build cache
// and fails unless every binary is byte-for-byte the same.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/bulkhead-edge/bulkhead/control/opscli"
	"github.com/bulkhead-edge/bulkhead/cross"
	"github.com/bulkhead-edge/bulkhead/installer"
)

func main() {
	out := flag.String("out", "dist", "output `DIR`")
	version := flag.String("version", "dev", "version stamped into the binaries")
	check := flag.Bool("check", false, "build again from an empty build cache and compare (reproducibility)")
	flag.Parse()
	if err := run(*out, *version, *check); err != nil {
		fmt.Fprintln(os.Stderr, "bulkhead-cross:", err)
		os.Exit(1)
	}
}

func run(out, version string, check bool) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	var sums strings.Builder
	var failed []string
	fmt.Printf("%-14s %10s  %s\n", "target", "size", "sha256")
	for _, t := range cross.Targets {
		path := cross.Output(out, t)
		size, sum, err := cross.Build(t, version, path)
		if err != nil {
			return err
		}
		fmt.Printf("%-14s %6.2f MiB  %s\n", t.Name, cross.MiB(size), sum)
		fmt.Fprintf(&sums, "%s  %s\n", sum, filepath.Base(path))
		if t.Name == cross.BudgetTarget && size > cross.Budget {
			failed = append(failed, fmt.Sprintf("%s is %.2f MiB, over its budget of %.0f MiB", t.Name, cross.MiB(size), cross.MiB(cross.Budget)))
		}
		if !check {
			continue
		}
		again, err := rebuild(t, version)
		if err != nil {
			return err
		}
		if again != sum {
			failed = append(failed, fmt.Sprintf("%s is not reproducible: %s, then %s from an empty build cache", t.Name, sum, again))
		} else {
			fmt.Printf("%-14s reproduced from an empty build cache\n", "")
		}
	}
	for _, t := range cross.ControlTargets {
		path := cross.ControlOutput(out, t)
		size, sum, err := cross.BuildMain(t, cross.Control, "", version, path)
		if err != nil {
			return err
		}
		fmt.Printf("%-14s %6.2f MiB  %s  (control)\n", t.Name, cross.MiB(size), sum)
		fmt.Fprintf(&sums, "%s  %s\n", sum, filepath.Base(path))
	}
	if err := os.WriteFile(filepath.Join(out, "SHA256SUMS"), []byte(sums.String()), 0o644); err != nil {
		return err
	}
	// The units the packages ship, for the binaries where they put them,
	// and control's environment file.
	for name, text := range map[string]string{
		"bulkhead.service":         installer.SystemdUnit(installer.PackagedBinary),
		"bulkhead-control.service": opscli.SystemdUnit,
		"bulkhead-control.env":     opscli.EnvFile,
	} {
		if err := os.WriteFile(filepath.Join(out, name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%s", strings.Join(failed, "; "))
	}
	return nil
}

// rebuild builds t again in a scratch directory with its own, empty
// build cache: nothing is reused from the first build.
func rebuild(t cross.Target, version string) (string, error) {
	dir, err := os.MkdirTemp("", "bulkhead-cross-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	_, sum, err := cross.Build(t, version, filepath.Join(dir, "bulkhead"), "GOCACHE="+filepath.Join(dir, "cache"))
	return sum, err
}
