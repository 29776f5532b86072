// Command deb is `make deb`: it packages the agents `make cross` built in
// dist/ as Debian packages for amd64, arm64 and armhf, and the control
// server for amd64 and arm64, with nfpm (a maintained Go packaging
// library), then checks each package as dpkg sees it: its architecture
// and files, its unit under systemd-analyze (control's hardening scored by
// systemd-analyze security), and its binary run (natively or under
// qemu-user).
//
// It is a module of its own so that nfpm's dependencies (go-git, sprig,
// compressors) never enter the agent's module graph. `go mod tidy` fails
// here: nfpm's own tests import its rpm and msix packages, whose modules
// the proxy refuses; update with `go get github.com/goreleaser/nfpm/v2/deb@VERSION`.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

// arches maps Debian architectures to the dist/ binaries built for them
// and the qemu-user that runs them here.
var arches = []struct{ deb, dist, qemu string }{
	{"amd64", "bulkhead-linux-amd64", ""},
	{"arm64", "bulkhead-linux-arm64", "qemu-aarch64-static"},
	{"armhf", "bulkhead-linux-armv7", "qemu-arm-static"},
}

// Where the package puts things; the unit's ExecStart names Binary, and
// `bulkhead install` run from Binary uses it in place.
const (
	Binary = "/usr/sbin/bulkhead"
	Unit   = "/lib/systemd/system/bulkhead.service"

	ControlBinary = "/usr/bin/bulkhead-control"
	ControlUnit   = "/lib/systemd/system/bulkhead-control.service"
	ControlEnv    = "/etc/bulkhead-control/env"
)

// controlArches are the control server's packages.
var controlArches = []struct{ deb, dist, qemu string }{
	{"amd64", "bulkhead-control-linux-amd64", ""},
	{"arm64", "bulkhead-control-linux-arm64", "qemu-aarch64-static"},
}

// maxExposure is the most systemd-analyze security may score control's
// unit (0 is sealed, 10 is root with everything): a server that needs no
// privilege gets none.
const maxExposure = 2.0

// package_ is one package to build: the agent's or control's.
type package_ struct {
	name, description string
	binary, unit      string
	contents          func(dist, bin string, mtime time.Time) files.Contents
	scripts           nfpm.Scripts
	recommends        []string
	// runs is the binary's version line prefix.
	runs string
}

// prerm runs when the package is removed: the service goes, the table
// stays (fail closed), and so do the configuration and state, which
// `bulkhead uninstall --purge` removes.
const prerm = `#!/bin/sh
set -e
if [ "$1" = remove ] && [ -x /usr/sbin/bulkhead ]; then
	/usr/sbin/bulkhead uninstall || true
fi
`

func main() {
	dist := flag.String("dist", "dist", "`DIR` with the binaries and bulkhead.service from `make cross`; the packages go there too")
	license := flag.String("license", "LICENSE", "the license `FILE`, shipped as the package's copyright")
	version := flag.String("version", "dev", "version (git describe); made a Debian version if it is not one")
	flag.Parse()
	if err := run(*dist, *license, debVersion(*version)); err != nil {
		fmt.Fprintln(os.Stderr, "deb:", err)
		os.Exit(1)
	}
}

// debVersion makes git describe's output a Debian version: a release tag
// v1.2.0-3-gabc1234 becomes 1.2.0.3.gabc1234; a bare commit such as
// 8a97a0f-dirty, which is no version, becomes 0.0.0~git8a97a0f.dirty so
// that it sorts below every release.
func debVersion(v string) string {
	v = strings.TrimPrefix(v, "v")
	if !release.MatchString(v) {
		v = "0.0.0~git" + v
	}
	return strings.ReplaceAll(v, "-", ".")
}

var release = regexp.MustCompile(`^[0-9]+\.[0-9]+`)

func run(dist, license, version string) error {
	scratch, err := os.MkdirTemp("", "bulkhead-deb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	prermFile := filepath.Join(scratch, "prerm")
	if err := os.WriteFile(prermFile, []byte(prerm), 0o755); err != nil {
		return err
	}
	mtime := time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, err)
		}
		mtime = time.Unix(sec, 0).UTC()
	}
	agent := package_{name: "bulkhead", binary: Binary, unit: Unit, runs: "bulkhead ",
		description: "zero-trust edge agent for logistics devices\nEnforces a signed network policy with nftables and WireGuard microtunnels,\nkeeps enforcing offline from its cache, and obeys the security desk's\nquarantine and partner-disconnect commands. Run `bulkhead install` to enrol.",
		recommends:  []string{"nftables"}, scripts: nfpm.Scripts{PreRemove: prermFile},
		contents: func(dist, bin string, mtime time.Time) files.Contents {
			return files.Contents{
				{Source: filepath.Join(dist, bin), Destination: Binary, FileInfo: &files.ContentFileInfo{Mode: 0o755, MTime: mtime}},
				{Source: filepath.Join(dist, "bulkhead.service"), Destination: Unit, FileInfo: &files.ContentFileInfo{Mode: 0o644, MTime: mtime}},
			}
		}}
	control := package_{name: "bulkhead-control", binary: ControlBinary, unit: ControlUnit, runs: "bulkhead-control ",
		description: "control server for a Bulkhead fleet\nEnrols devices, forwards ops-signed policy and routes the security desk's\norders, from one bbolt file or a PostgreSQL database shared by replicas.\nSet BULKHEAD_DB and BULKHEAD_CONTROL_ARGS in /etc/bulkhead-control/env.",
		contents: func(dist, bin string, mtime time.Time) files.Contents {
			return files.Contents{
				{Source: filepath.Join(dist, bin), Destination: ControlBinary, FileInfo: &files.ContentFileInfo{Mode: 0o755, MTime: mtime}},
				{Source: filepath.Join(dist, "bulkhead-control.service"), Destination: ControlUnit, FileInfo: &files.ContentFileInfo{Mode: 0o644, MTime: mtime}},
				{Source: filepath.Join(dist, "bulkhead-control.env"), Destination: ControlEnv, Type: files.TypeConfigNoReplace, FileInfo: &files.ContentFileInfo{Mode: 0o640, MTime: mtime}},
			}
		}}
	for _, p := range []struct {
		pkg    package_
		arches []struct{ deb, dist, qemu string }
	}{{agent, arches}, {control, controlArches}} {
		for _, a := range p.arches {
			out := filepath.Join(dist, fmt.Sprintf("%s_%s_%s.deb", p.pkg.name, version, a.deb))
			if err := build(p.pkg, dist, a.dist, a.deb, version, license, mtime, out); err != nil {
				return fmt.Errorf("%s %s: %w", p.pkg.name, a.deb, err)
			}
			what, err := check(p.pkg, out, a.deb, a.qemu)
			if err != nil {
				return fmt.Errorf("%s: %w", out, err)
			}
			st, _ := os.Stat(out)
			fmt.Printf("%-48s %6.2f MiB  checked: architecture, files, unit%s, binary runs\n", out, float64(st.Size())/(1<<20), what)
		}
	}
	return nil
}

func build(p package_, dist, bin, arch, version, license string, mtime time.Time, out string) error {
	contents := append(p.contents(dist, bin, mtime),
		&files.Content{Source: license, Destination: "/usr/share/doc/" + p.name + "/copyright", FileInfo: &files.ContentFileInfo{Mode: 0o644, MTime: mtime}})
	info := nfpm.WithDefaults(&nfpm.Info{
		Name:        p.name,
		Arch:        arch,
		Platform:    "linux",
		Version:     version,
		Section:     "net",
		Priority:    "optional",
		Maintainer:  "Bulkhead maintainers <security@bulkhead.invalid>",
		Description: p.description,
		Homepage:    "https://github.com/bulkhead-edge/bulkhead",
		License:     "See /usr/share/doc/" + p.name + "/copyright",
		MTime:       mtime,
		Overridables: nfpm.Overridables{
			Recommends: p.recommends,
			Contents:   contents,
			Scripts:    p.scripts,
		},
	})
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := deb.Default.Package(info, f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// check reads the package back with dpkg-deb, verifies the unit inside it
// with systemd-analyze against the unpacked tree (and scores control's
// hardening), and runs the binary. It says what it checked beyond that.
func check(p package_, pkg, arch, qemu string) (string, error) {
	field, err := output("dpkg-deb", "--field", pkg, "Architecture")
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(field) != arch {
		return "", fmt.Errorf("architecture %q, want %s", strings.TrimSpace(field), arch)
	}
	list, err := output("dpkg-deb", "--contents", pkg)
	if err != nil {
		return "", err
	}
	for _, want := range []string{"-rwxr-xr-x root/root", "." + p.binary, "." + p.unit} {
		if !strings.Contains(list, want) {
			return "", fmt.Errorf("contents lack %q:\n%s", want, list)
		}
	}
	dir, err := os.MkdirTemp("", "bulkhead-deb-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	if _, err := output("dpkg-deb", "--extract", pkg, dir); err != nil {
		return "", err
	}
	if p.unit == ControlUnit {
		// Control's unit has the default dependencies (sysinit.target,
		// network-online.target, ...); verify resolves them in the tree.
		if err := copyTargets(filepath.Join(dir, "lib/systemd/system")); err != nil {
			return "", err
		}
	}
	if out, err := output("systemd-analyze", "verify", "--root="+dir, p.unit); err != nil || strings.TrimSpace(out) != "" {
		return "", fmt.Errorf("systemd-analyze verify %s: %v\n%s", p.unit, err, out)
	}
	what := ""
	if p.unit == ControlUnit {
		score, err := exposure(dir, p.unit)
		if err != nil {
			return "", err
		}
		if score > maxExposure {
			return "", fmt.Errorf("%s: systemd-analyze security scores its exposure %.1f, over %.1f", p.unit, score, maxExposure)
		}
		what = fmt.Sprintf(" (exposure %.1f)", score)
	}
	argv := []string{filepath.Join(dir, p.binary), "version"}
	if qemu != "" {
		argv = append([]string{qemu}, argv...)
	}
	out, err := output(argv[0], argv[1:]...)
	if err != nil || !strings.HasPrefix(out, p.runs) {
		return "", fmt.Errorf("%s: %v %q", strings.Join(argv, " "), err, out)
	}
	return what, nil
}

// copyTargets copies this machine's systemd targets into dir.
func copyTargets(dir string) error {
	targets, err := filepath.Glob("/lib/systemd/system/*.target")
	if err != nil || len(targets) == 0 {
		return fmt.Errorf("no systemd targets in /lib/systemd/system to verify against (is systemd installed?): %v", err)
	}
	for _, t := range targets {
		raw, err := os.ReadFile(t)
		if err != nil {
			continue // a dangling link
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(t)), raw, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// exposure is systemd-analyze security's overall score for unit in the
// unpacked tree root.
func exposure(root, unit string) (float64, error) {
	out, err := output("systemd-analyze", "security", "--offline=true", "--root="+root, unit)
	if err != nil {
		return 0, err
	}
	m := overall.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("systemd-analyze security %s: no overall exposure in:\n%s", unit, out)
	}
	return strconv.ParseFloat(m[1], 64)
}

var overall = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)

func output(name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), err
}
