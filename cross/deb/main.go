// Command deb is `make deb`: it packages the agents `make cross` built in
// dist/ as Debian packages for amd64, arm64 and armhf with nfpm (a
// maintained Go packaging library), then checks each package as dpkg sees
// it: its architecture and files, its unit under systemd-analyze, and its
// binary run (natively or under qemu-user).
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
)

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
	for _, a := range arches {
		out := filepath.Join(dist, fmt.Sprintf("bulkhead_%s_%s.deb", version, a.deb))
		if err := build(dist, a.dist, a.deb, version, license, prermFile, mtime, out); err != nil {
			return fmt.Errorf("%s: %w", a.deb, err)
		}
		if err := check(out, a.deb, a.qemu); err != nil {
			return fmt.Errorf("%s: %w", out, err)
		}
		st, _ := os.Stat(out)
		fmt.Printf("%-40s %6.2f MiB  checked: architecture, files, unit, binary runs\n", out, float64(st.Size())/(1<<20))
	}
	return nil
}

func build(dist, bin, arch, version, license, prermFile string, mtime time.Time, out string) error {
	info := nfpm.WithDefaults(&nfpm.Info{
		Name:        "bulkhead",
		Arch:        arch,
		Platform:    "linux",
		Version:     version,
		Section:     "net",
		Priority:    "optional",
		Maintainer:  "Bulkhead maintainers <security@bulkhead.invalid>",
		Description: "zero-trust edge agent for logistics devices\nEnforces a signed network policy with nftables and WireGuard microtunnels,\nkeeps enforcing offline from its cache, and obeys the security desk's\nquarantine and partner-disconnect commands. Run `bulkhead install` to enrol.",
		Homepage:    "https://github.com/bulkhead-edge/bulkhead",
		License:     "See /usr/share/doc/bulkhead/copyright",
		MTime:       mtime,
		Overridables: nfpm.Overridables{
			Recommends: []string{"nftables"},
			Contents: files.Contents{
				{Source: filepath.Join(dist, bin), Destination: Binary, FileInfo: &files.ContentFileInfo{Mode: 0o755, MTime: mtime}},
				{Source: filepath.Join(dist, "bulkhead.service"), Destination: Unit, FileInfo: &files.ContentFileInfo{Mode: 0o644, MTime: mtime}},
				{Source: license, Destination: "/usr/share/doc/bulkhead/copyright", FileInfo: &files.ContentFileInfo{Mode: 0o644, MTime: mtime}},
			},
			Scripts: nfpm.Scripts{PreRemove: prermFile},
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
// with systemd-analyze against the unpacked tree, and runs the binary.
func check(pkg, arch, qemu string) error {
	field, err := output("dpkg-deb", "--field", pkg, "Architecture")
	if err != nil {
		return err
	}
	if strings.TrimSpace(field) != arch {
		return fmt.Errorf("architecture %q, want %s", strings.TrimSpace(field), arch)
	}
	list, err := output("dpkg-deb", "--contents", pkg)
	if err != nil {
		return err
	}
	for _, want := range []string{"-rwxr-xr-x root/root", "." + Binary, "." + Unit} {
		if !strings.Contains(list, want) {
			return fmt.Errorf("contents lack %q:\n%s", want, list)
		}
	}
	dir, err := os.MkdirTemp("", "bulkhead-deb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if _, err := output("dpkg-deb", "--extract", pkg, dir); err != nil {
		return err
	}
	if out, err := output("systemd-analyze", "verify", "--root="+dir, Unit); err != nil || strings.TrimSpace(out) != "" {
		return fmt.Errorf("systemd-analyze verify %s: %v\n%s", Unit, err, out)
	}
	argv := []string{filepath.Join(dir, Binary), "version"}
	if qemu != "" {
		argv = append([]string{qemu}, argv...)
	}
	out, err := output(argv[0], argv[1:]...)
	if err != nil || !strings.HasPrefix(out, "bulkhead ") {
		return fmt.Errorf("%s: %v %q", strings.Join(argv, " "), err, out)
	}
	return nil
}

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
