// Package installer owns putting the agent on a device and taking it off:
// the file layout, the service for the host's init system (systemd,
// OpenRC or SysV, through kardianos/service), the checks for the usual
// field mistakes, enrolment at install, and pinning the ops keys.
//
// Install is idempotent: it compares what it would write with what is
// there, changes only what differs, and says for each step what it did.
package installer

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// Where an installed agent lives.
const (
	// PackagedBinary is where the .deb puts the agent; an install run
	// from it uses it in place.
	PackagedBinary = "/usr/sbin/bulkhead"
	// LocalBinary is where install copies any other agent binary.
	LocalBinary = "/usr/local/sbin/bulkhead"
	ConfigDir   = "/etc/bulkhead"
	ConfigFile  = ConfigDir + "/config.json"
	StateDir    = config.DefaultStateDir
)

// Options are install's inputs.
type Options struct {
	Control string // https://HOST:PORT
	Token   string // one-time enrolment token; not needed once enrolled
	TrustCA string // SHA256:HEX of the control CA
	Class   string // device class; empty takes the token's
	// SafetyFloor replaces the configured floor when SetFloor is true;
	// otherwise an existing configuration's floor is kept.
	SafetyFloor []localpolicy.FloorRule
	SetFloor    bool
	// TrustKeys are ops.pub files to pin. Without them the keys the
	// control server publishes at enrolment are pinned; with both, they
	// must be the same keys.
	TrustKeys []string
	// Segments makes the host a segment gateway of these segments (its
	// token must be a gateway token for exactly them), listening for
	// devices on ListenPort (default 51820), the port the policy names.
	Segments   []string
	ListenPort uint16
	Out        io.Writer
}

// DefaultGatewayPort is a gateway's WireGuard port unless told otherwise.
const DefaultGatewayPort = 51820

// GatewayClass is the class a gateway enrols as unless told otherwise:
// the policy declares it, with no rules, so bundles may target gateways.
const GatewayClass = "segment-gateway"

// Install puts the agent on this host as a service and enrols it. Every
// check that can fail without changing anything runs first: a field
// mistake leaves the host as it was.
func Install(ctx context.Context, o Options) error {
	p := printer{o.Out}
	if len(o.Segments) > 0 {
		o.Class = cmp.Or(o.Class, GatewayClass)
		o.ListenPort = cmp.Or(o.ListenPort, DefaultGatewayPort)
		slices.Sort(o.Segments)
		o.Segments = slices.Compact(o.Segments)
	}
	if err := checkRoot("install"); err != nil {
		return err
	}
	if err := checkNFTables(); err != nil {
		return err
	}
	if err := checkTUN(TUNDevice); err != nil {
		return err
	}
	p.say("checked", "running as root; the kernel has nf_tables and %s", TUNDevice)
	pinned, err := readTrustKeys(o.TrustKeys)
	if err != nil {
		return err
	}
	cfg, err := readConfig(ConfigFile)
	if err != nil {
		return err
	}

	rec, err := controlclient.Load(StateDir)
	switch {
	case errors.Is(err, controlclient.ErrNotEnrolled):
		rec = nil
		if o.Token == "" {
			return errors.New("this device is not enrolled yet: --token is needed (bulkhead-control token create --class CLASS)")
		}
		if _, err := controlclient.Probe(ctx, o.Control, o.TrustCA); err != nil {
			return err
		}
		p.say("control", "%s answers with the pinned CA", o.Control)
	case err != nil:
		return fmt.Errorf("enrolment record in %s: %w", StateDir, err)
	case rec.URL != o.Control:
		return fmt.Errorf("already enrolled as %s with %s, not %s: to move it, run bulkhead uninstall --purge first, then install with a new token",
			rec.DeviceID, rec.URL, o.Control)
	case o.Class != "" && rec.Class != o.Class:
		return fmt.Errorf("already enrolled as %s of class %s, not %s: to change its class, bulkhead uninstall --purge and install with a token for %s",
			rec.DeviceID, rec.Class, o.Class, o.Class)
	case !slices.Equal(rec.Segments, o.Segments):
		return fmt.Errorf("already enrolled as %s, %s, not %s: to change it, bulkhead uninstall --purge and install with a new token",
			rec.DeviceID, roleText(rec.Segments), roleText(o.Segments))
	default:
		if fp, err := controlapi.ParseFingerprint(o.TrustCA); err != nil {
			return err
		} else if fp != rec.Fingerprint {
			return fmt.Errorf("already enrolled with %s under CA %s, but --trust-ca says %s: check the fingerprint", rec.URL, rec.Fingerprint, fp)
		}
	}

	_, statErr := os.Stat(StateDir)
	changedState, err := ensureDir(StateDir, 0o700)
	if err != nil {
		return err
	}
	enrolled := rec != nil
	if !enrolled {
		if rec, err = enrol(ctx, o, agentAnswers(cfg.socket()), cfg.socket()); err != nil {
			// A refused token leaves the host as it was.
			if errors.Is(statErr, os.ErrNotExist) {
				os.RemoveAll(StateDir)
			}
			return err
		}
	}
	p.said("state", StateDir+" (0700)", changedState, "created")
	if !enrolled {
		p.say("enrolled", "as %s (class %s, %s) with %s", rec.DeviceID, rec.Class, roleText(rec.Segments), rec.URL)
	} else {
		p.say("enrolled", "as %s (class %s) with %s: kept", rec.DeviceID, rec.Class, rec.URL)
	}
	binary, changedBin, err := placeBinary(p)
	if err != nil {
		return err
	}

	if _, err := ensureDir(ConfigDir, 0o755); err != nil {
		return err
	}
	keys, changedKeys, err := pinKeys(p, cfg, pinned, rec)
	if err != nil {
		return err
	}
	cfg.raw.Device.ID, cfg.raw.Device.Class = rec.DeviceID, rec.Class
	if rec.Gateway() {
		cfg.raw.Gateway = &config.GatewayConfig{Segments: rec.Segments}
		cfg.raw.Tunnel.ListenPort = o.ListenPort
	}
	cfg.raw.Trust.Keys, cfg.raw.Trust.Threshold = keys.files, keys.threshold
	if o.SetFloor {
		cfg.raw.SafetyFloor = o.SafetyFloor
	}
	changedCfg, err := cfg.write()
	if err != nil {
		return err
	}
	p.said("config", fmt.Sprintf("%s (0600), safety floor of %d rules", ConfigFile, len(cfg.raw.SafetyFloor)), changedCfg, "written")

	svc, err := newService(binary)
	if err != nil {
		return err
	}
	changedSvc, err := svc.install()
	if err != nil {
		return err
	}
	p.said("service", fmt.Sprintf("%s for %s at %s", svc.name(), svc.platform, svc.path), changedSvc, "installed")

	running := agentAnswers(cfg.socket())
	switch changed := changedBin || changedKeys || changedCfg || changedSvc; {
	case !running:
		if err := svc.Start(); err != nil {
			return fmt.Errorf("start the service: %w", err)
		}
		p.say("started", "%s", svc.name())
	case changed:
		if err := svc.Restart(); err != nil {
			return fmt.Errorf("restart the service: %w", err)
		}
		p.say("restarted", "%s, to take up the changes", svc.name())
	default:
		p.say("running", "%s: unchanged", svc.name())
	}
	st, err := waitForAgent(cfg.socket(), 20*time.Second)
	if err != nil {
		return fmt.Errorf("the service started but the agent does not answer: %w (see %s)", err, svc.logHint())
	}
	p.say("agent", "mode %s, %s", st.Mode, policyLine(st))
	fmt.Fprintf(p.w, "\nCheck it with:\n  bulkhead status\n  %s\n  nft list table inet bulkhead\n", svc.statusHint())
	return nil
}

// roleText says what a host enrols as: a device, or a gateway of
// segments.
func roleText(segments []string) string {
	if len(segments) == 0 {
		return "a device"
	}
	return "a gateway of " + strings.Join(segments, ", ")
}

func policyLine(st *adminapi.Status) string {
	if st.PolicyVersion == 0 {
		return "no policy yet (lockdown until the control server sends one)"
	}
	return fmt.Sprintf("policy version %d", st.PolicyVersion)
}

// enrol enrols through the running agent, whose table must open the way
// to the control server, or directly when no agent runs yet.
func enrol(ctx context.Context, o Options, running bool, socket string) (*controlclient.Record, error) {
	if running {
		if _, err := (adminapi.Client{Socket: socket}).Enroll(o.Control, o.Token, o.TrustCA); err != nil {
			return nil, err
		}
	} else {
		key, _, err := tunnel.LoadOrCreateKey(filepath.Join(StateDir, "wg.key"))
		if err != nil {
			return nil, err
		}
		ep, err := controlclient.Endpoint(ctx, o.Control)
		if err != nil {
			return nil, err
		}
		if _, err := controlclient.Enroll(ctx, StateDir, o.Control, o.Token, o.TrustCA, controlclient.Who{Class: o.Class, Segments: o.Segments}, key.Public().String(), ep); err != nil {
			return nil, fmt.Errorf("enrolment failed: %w", err)
		}
	}
	return controlclient.Load(StateDir)
}

type trustRoot struct {
	files     []string
	threshold int
}

// pinKeys decides the ops trust root and writes its keys into ConfigDir.
// A configuration that already pins keys keeps them: later rotations are
// signed and live in the agent's store.
func pinKeys(p printer, cfg *configFile, given []ed25519.PublicKey, rec *controlclient.Record) (trustRoot, bool, error) {
	if len(cfg.raw.Trust.Keys) > 0 {
		p.say("ops keys", "%d pinned in %s: kept", len(cfg.raw.Trust.Keys), ConfigFile)
		return trustRoot{cfg.raw.Trust.Keys, cfg.raw.Trust.Threshold}, false, nil
	}
	published := make([]ed25519.PublicKey, len(rec.OpsKeys))
	for i, k := range rec.OpsKeys {
		published[i] = k
	}
	keys, threshold, from := given, 0, "given with --trust-key"
	switch {
	case len(given) == 0 && len(published) == 0:
		return trustRoot{}, false, fmt.Errorf("no ops keys to pin: the control server publishes none (start it with --ops-pub) and no --trust-key was given; " +
			"the enrolment is kept, so install again with --trust-key ops.pub")
	case len(given) == 0:
		keys, threshold, from = published, rec.OpsThreshold, "published by the control server"
	case len(published) > 0 && !sameKeys(given, published):
		return trustRoot{}, false, fmt.Errorf("the control server publishes ops keys %s, but --trust-key gave %s: refusing to pin either",
			strings.Join(ids(published), ", "), strings.Join(ids(given), ", "))
	case len(published) > 0:
		threshold = rec.OpsThreshold
	}
	threshold = opskey.OrAll(threshold, len(keys))
	var root trustRoot
	changed := false
	for _, k := range keys {
		id := opskey.ID(k)
		path := filepath.Join(ConfigDir, "ops-"+id[:16]+".pub")
		c, err := writeIfChanged(path, opskey.EncodePublic(k), 0o644)
		if err != nil {
			return trustRoot{}, false, err
		}
		changed = changed || c
		root.files = append(root.files, path)
	}
	root.threshold = threshold
	p.say("ops keys", "pinned %d (threshold %d), %s: %s", len(keys), threshold, from, strings.Join(ids(keys), ", "))
	return root, changed, nil
}

func ids(keys []ed25519.PublicKey) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = opskey.ID(k)[:16]
	}
	slices.Sort(out)
	return out
}

func sameKeys(a, b []ed25519.PublicKey) bool { return slices.Equal(ids(a), ids(b)) }

func readTrustKeys(files []string) ([]ed25519.PublicKey, error) {
	if len(files) == 0 {
		return nil, nil
	}
	return opskey.LoadPublicKeys(files)
}

// placeBinary copies the running binary to LocalBinary, unless it runs
// from where the package put it.
func placeBinary(p printer) (string, bool, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", false, err
	}
	if exe == PackagedBinary {
		p.say("binary", "%s (from the package): kept", exe)
		return exe, false, nil
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		return "", false, err
	}
	if err := os.MkdirAll(filepath.Dir(LocalBinary), 0o755); err != nil {
		return "", false, err
	}
	changed, err := writeIfChanged(LocalBinary, data, 0o755)
	if err != nil {
		return "", false, err
	}
	p.said("binary", LocalBinary, changed, "copied from "+exe)
	return LocalBinary, changed, nil
}

// configFile is the configuration as written, without the defaults the
// agent fills in, so that writing it back changes nothing.
type configFile struct {
	raw  config.Config // as written; Resolve gives what the agent runs with
	was  []byte
	path string
}

func readConfig(path string) (*configFile, error) {
	c := &configFile{path: path}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return c, nil
	case err != nil:
		return nil, err
	}
	if err := strictjson.Unmarshal(data, &c.raw); err != nil {
		return nil, fmt.Errorf("existing configuration %s: %s (fix or remove it)", path, strictjson.Line(data, err))
	}
	c.was = data
	return c, nil
}

func (c *configFile) socket() string {
	if c.raw.AdminSocket != "" {
		return c.raw.AdminSocket
	}
	return config.DefaultSocket
}

// write checks the configuration as the agent will read it, and writes
// it if it differs from what is there.
func (c *configFile) write() (bool, error) {
	data, err := json.Marshal(&c.raw, jsontext.Multiline(true), jsontext.WithIndent("  "))
	if err != nil {
		return false, err
	}
	data = append(data, '\n')
	if _, err := config.Parse(data, c.path); err != nil {
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(c.path), 0o755); err != nil {
		return false, err
	}
	return writeIfChanged(c.path, data, 0o600)
}

// writeIfChanged replaces path atomically when its content or mode
// differs, and says whether it did.
func writeIfChanged(path string, data []byte, mode os.FileMode) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		st, err := os.Stat(path)
		if err == nil && st.Mode().Perm() == mode {
			return false, nil
		}
	}
	return true, atomicfile.Write(path, data, mode)
}

// ensureDir makes dir with mode, or corrects the mode of one that exists.
func ensureDir(dir string, mode os.FileMode) (bool, error) {
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, mode); err != nil {
			return false, err
		}
		return true, os.Chmod(dir, mode)
	case err != nil:
		return false, err
	case !st.IsDir():
		return false, fmt.Errorf("%s exists and is not a directory", dir)
	case st.Mode().Perm() != mode:
		return true, os.Chmod(dir, mode)
	}
	return false, nil
}

func agentAnswers(socket string) bool {
	_, err := adminapi.Client{Socket: socket}.Status()
	return err == nil
}

func waitForAgent(socket string, timeout time.Duration) (*adminapi.Status, error) {
	deadline := time.Now().Add(timeout)
	for {
		st, err := adminapi.Client{Socket: socket}.Status()
		if err == nil && st != nil {
			return st, nil
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// printer writes install's and uninstall's account of what they did, one
// aligned line per step.
type printer struct{ w io.Writer }

func (p printer) say(step, format string, args ...any) {
	fmt.Fprintf(p.w, "%-10s%s\n", step, fmt.Sprintf(format, args...))
}

// said reports a step that either did what (changed) or found it done.
func (p printer) said(step, subject string, changed bool, what string) {
	if changed {
		p.say(step, "%s: %s", subject, what)
	} else {
		p.say(step, "%s: unchanged", subject)
	}
}
