package posture

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"golang.org/x/mod/semver"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Result is one check judged on one sample.
type Result struct {
	Pass     bool
	Observed string
	Expected string
}

// Wants are the facts a set of checks needs beyond the ones every sample
// has: files to hash, filesystems to measure, process executables to hash.
type Wants struct {
	Files     []string
	Disks     []string
	HashNames []string // process names whose executables are hashed
	// Required are the process names a check needs running: Watch
	// follows their exit.
	Required []string
}

// Want says what checks need gathered.
func Want(checks []policy.Check) Wants {
	var w Wants
	for _, c := range checks {
		switch {
		case c.File != nil:
			w.Files = append(w.Files, c.File.Path)
		case c.FreeDisk != nil:
			w.Disks = append(w.Disks, c.FreeDisk.Path)
		case c.Process != nil:
			w.Required = append(w.Required, c.Process.Name)
			if c.Process.SHA256 != "" {
				w.HashNames = append(w.HashNames, c.Process.Name)
			}
		case c.ForbiddenProcess != nil && c.ForbiddenProcess.SHA256 != "":
			w.HashNames = append(w.HashNames, c.ForbiddenProcess.Name)
		}
	}
	return w
}

// Judge decides one check on one sample. A traffic check is judged over a
// window of samples, by Tracker; alone, it fails.
func Judge(c policy.Check, f *Facts) Result {
	if r, unread := unreadFor(c, f); unread {
		return r
	}
	switch {
	case c.Kernel != nil:
		return judgeVersion(f.Kernel, c.Kernel.Min, c.Kernel.Below)
	case len(c.OS) > 0:
		return Result{Pass: slices.Contains(c.OS, f.OS), Observed: f.OS, Expected: "one of " + strings.Join(c.OS, ", ")}
	case c.AgentVersion != "":
		return judgeVersion(f.AgentVersion, c.AgentVersion, "")
	case c.Process != nil:
		return judgeProcess(*c.Process, f.Processes)
	case c.ForbiddenProcess != nil:
		return judgeForbidden(*c.ForbiddenProcess, f.Processes)
	case c.Listeners != nil:
		return judgeListeners(c.Listeners, f)
	case c.File != nil:
		return judgeFile(*c.File, f.Files)
	case c.FreeDisk != nil:
		return judgeDisk(*c.FreeDisk, f.Disks)
	case c.Traffic != nil:
		// A window needs the samples before this one: Tracker judges it.
		return Result{Observed: "one sample", Expected: "a window of samples (judged by the tracker)"}
	case c.MaxClockSkew > 0:
		return judgeSkew(f.ClockSkew, time.Duration(c.MaxClockSkew))
	case c.Geofence != nil:
		fix := *f.Location
		in, where := Inside(*c.Geofence, fix.Lat, fix.Lon)
		r := Result{Pass: in, Observed: fix.String() + ", " + where, Expected: "inside the geofence"}
		if fix.Age > 0 {
			r.Observed += fmt.Sprintf(" (fix %s old)", fix.Age.Round(time.Second))
		}
		return r
	case c.MaxFixAge > 0:
		fix := *f.Location
		return Result{Pass: fix.Age <= time.Duration(c.MaxFixAge), Observed: fmt.Sprintf("fix from %s %s old", fix.Source, fix.Age.Round(time.Second)), Expected: "a fix at most " + time.Duration(c.MaxFixAge).String() + " old"}
	case c.TableIntact:
		if len(f.Tampered) > 0 {
			return Result{Observed: "table changed from outside: " + strings.Join(f.Tampered, "; "), Expected: "only the agent changes its table"}
		}
		return Result{Pass: true, Observed: "table unchanged since the previous sample", Expected: "only the agent changes its table"}
	case c.MaxUptime > 0:
		up := f.Uptime.Truncate(time.Minute)
		return Result{Pass: f.Uptime <= time.Duration(c.MaxUptime), Observed: "up " + up.String(), Expected: "up at most " + time.Duration(c.MaxUptime).String()}
	}
	return Result{Observed: "a check this agent does not know", Expected: "a known check"}
}

// unreadFor fails c when the list it is judged on could not be read: an
// empty list would prove nothing.
func unreadFor(c policy.Check, f *Facts) (Result, bool) {
	list := needs(c)
	if list == "" || !slices.Contains(f.Unread, list) && !(list == "location" && f.Location == nil) {
		return Result{}, false
	}
	switch list {
	case "clock":
		return Result{Observed: "no time from control since the agent started", Expected: "within " + time.Duration(c.MaxClockSkew).String() + " of control's time"}, true
	case "table":
		return Result{Observed: "the table could not be read back", Expected: "only the agent changes its table"}, true
	case "location":
		return Result{Observed: "no position fix yet", Expected: "a position fix"}, true
	}
	return Result{Observed: "the " + list + " could not be read", Expected: "a readable list of " + list}, true
}

// needs names the list c is judged on, when one sample may fail to read it.
func needs(c policy.Check) string {
	switch {
	case c.Process != nil, c.ForbiddenProcess != nil:
		return "processes"
	case c.Listeners != nil:
		return "sockets"
	case c.Traffic != nil:
		return "tunnel"
	case c.MaxClockSkew > 0:
		return "clock"
	case c.TableIntact:
		return "table"
	case c.Geofence != nil, c.MaxFixAge > 0:
		return "location"
	}
	return ""
}

// judgeSkew passes a clock within max of control's, either way.
func judgeSkew(skew, max time.Duration) Result {
	r := Result{Expected: "within " + max.String() + " of control's time"}
	abs, dir := skew, "ahead of"
	if skew < 0 {
		abs, dir = -skew, "behind"
	}
	r.Pass = abs <= max
	if abs = abs.Round(time.Millisecond); abs == 0 {
		r.Observed = "clock within 1ms of control's time"
	} else {
		r.Observed = "clock " + abs.String() + " " + dir + " control's time"
	}
	return r
}

// semverOf turns a version as kernels and builds write it ("6.1.0-18-amd64",
// "v1.4.0", "5.10") into a comparable semantic version, or "".
func semverOf(s string) string {
	s = strings.TrimPrefix(s, "v")
	end := 0
	for end < len(s) && (s[end] == '.' || s[end] >= '0' && s[end] <= '9') {
		end++
	}
	// What follows the numbers may only be a suffix ("-18-amd64"): a
	// build named by its commit ("1ea56bf") is no version at all.
	if end < len(s) && s[end] != '-' && s[end] != '+' {
		return ""
	}
	v := "v" + strings.TrimRight(s[:end], ".")
	if !semver.IsValid(v) {
		return ""
	}
	return v
}

func judgeVersion(observed, min, below string) Result {
	var want []string
	if min != "" {
		want = append(want, ">= "+min)
	}
	if below != "" {
		want = append(want, "< "+below)
	}
	r := Result{Observed: observed, Expected: strings.Join(want, " and ")}
	v := semverOf(observed)
	if v == "" {
		r.Observed = fmt.Sprintf("%q (not a comparable version)", observed)
		return r
	}
	r.Pass = (min == "" || semver.Compare(v, semverOf(min)) >= 0) && (below == "" || semver.Compare(v, semverOf(below)) < 0)
	return r
}

func judgeProcess(m policy.ProcessMatch, procs []Process) Result {
	r := Result{Expected: m.Name + " running"}
	if m.SHA256 != "" {
		r.Expected += " from an executable with sha256 " + short(m.SHA256)
	}
	var seen []string
	for _, p := range procs {
		if p.Name != m.Name {
			continue
		}
		if m.SHA256 == "" || p.SHA256 == m.SHA256 {
			return Result{Pass: true, Observed: fmt.Sprintf("%s running (pid %d)", m.Name, p.PID), Expected: r.Expected}
		}
		seen = append(seen, fmt.Sprintf("pid %d from %s with sha256 %s", p.PID, p.Exe, short(p.SHA256)))
	}
	if len(seen) == 0 {
		r.Observed = m.Name + " not running"
	} else {
		r.Observed = m.Name + " running only as " + strings.Join(seen, ", ")
	}
	return r
}

func judgeForbidden(m policy.ProcessMatch, procs []Process) Result {
	r := Result{Pass: true, Observed: m.Name + " not running", Expected: m.Name + " not running"}
	if m.SHA256 != "" {
		r.Expected = m.Name + " not running from an executable with sha256 " + short(m.SHA256)
	}
	for _, p := range procs {
		if p.Name == m.Name && (m.SHA256 == "" || p.SHA256 == m.SHA256) {
			return Result{Observed: fmt.Sprintf("%s running (pid %d)", m.Name, p.PID), Expected: r.Expected}
		}
	}
	return r
}

// judgeListeners fails on any socket listening beyond the device itself
// on a port the check does not allow. Loopback listeners and the agent's
// own sockets are not findings.
func judgeListeners(allowed []policy.Listener, f *Facts) Result {
	var want []string
	for _, l := range allowed {
		for _, pr := range l.Ports {
			want = append(want, fmt.Sprintf("%s %s", l.Protocol, pr))
		}
	}
	r := Result{Pass: true, Observed: "no other listener", Expected: "listeners only on " + strings.Join(want, ", ")}
	if len(want) == 0 {
		r.Expected = "no listener"
	}
	var bad []string
	for _, s := range f.Listeners {
		if s.PID == f.Self && f.Self != 0 || s.Local.Addr().IsLoopback() || listenerAllowed(allowed, s) {
			continue
		}
		who := ""
		if name := processName(f.Processes, s.PID); name != "" {
			who = " (" + name + ")"
		}
		bad = append(bad, fmt.Sprintf("%s %s%s", s.Protocol, s.Local, who))
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		r.Pass, r.Observed = false, "unexpected listener "+strings.Join(slices.Compact(bad), ", ")
	}
	return r
}

func listenerAllowed(allowed []policy.Listener, s Socket) bool {
	port := policy.PortRange{First: s.Local.Port(), Last: s.Local.Port()}
	for _, l := range allowed {
		if string(l.Protocol) != s.Protocol {
			continue
		}
		for _, pr := range l.Ports {
			if pr.Contains(port) {
				return true
			}
		}
	}
	return false
}

func processName(procs []Process, pid int32) string {
	for _, p := range procs {
		if p.PID == pid {
			return p.Name
		}
	}
	return ""
}

func judgeFile(d policy.FileDigest, files []File) Result {
	r := Result{Expected: fmt.Sprintf("%s with sha256 %s", d.Path, short(d.SHA256))}
	for _, fl := range files {
		if fl.Path != d.Path {
			continue
		}
		switch {
		case fl.Error != "":
			r.Observed = fl.Error
		case fl.SHA256 == d.SHA256:
			r.Pass, r.Observed = true, r.Expected
		default:
			r.Observed = fmt.Sprintf("%s with sha256 %s", d.Path, short(fl.SHA256))
		}
		return r
	}
	r.Observed = d.Path + " not sampled yet"
	return r
}

func judgeDisk(d policy.FreeDisk, disks []Disk) Result {
	r := Result{Expected: fmt.Sprintf("at least %s free on %s", bytesText(d.MinBytes), d.Path)}
	for _, dk := range disks {
		if dk.Path == d.Path {
			r.Pass = dk.Free >= d.MinBytes
			r.Observed = fmt.Sprintf("%s free on %s", bytesText(dk.Free), d.Path)
			return r
		}
	}
	r.Observed = d.Path + " could not be measured"
	return r
}

func short(digest string) string {
	if len(digest) > 12 {
		return digest[:12] + "…"
	}
	return digest
}

func bytesText(n uint64) string {
	const mib = 1 << 20
	if n >= 1<<30 {
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/mib)
}

// judgeTraffic decides a traffic check on what moved within its window.
// span is how much of the window the samples cover so far.
func judgeTraffic(l policy.TrafficLimit, moved uint64, span time.Duration) Result {
	return Result{Pass: moved <= l.MaxBytes,
		Observed: fmt.Sprintf("%d bytes to segment %s in %s", moved, l.Segment, span.Round(time.Second)),
		Expected: fmt.Sprintf("at most %d bytes in %s", l.MaxBytes, time.Duration(l.Window))}
}
