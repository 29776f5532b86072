package installer

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
)

// Uninstall stops and removes the service and the installed binary. The
// table stays, so the device keeps enforcing its last policy; with purge
// the table, the configuration and the state go too, and it says so.
func Uninstall(purge bool, out io.Writer) error {
	p := printer{out}
	if err := checkRoot("uninstall"); err != nil {
		return err
	}
	cfg, err := readConfig(ConfigFile)
	if err != nil && !purge {
		return err
	}
	socket := config.DefaultSocket
	if cfg != nil {
		socket = cfg.socket()
	}
	v, err := newService(LocalBinary)
	if err != nil {
		return err
	}
	// Stop fails when it is not running; whether it runs is asked of the
	// agent below. It also stops a unit the package installed.
	_ = v.Stop()
	if agentAnswers(socket) {
		return fmt.Errorf("the agent still answers on %s after stopping the service; stop it first (it may run outside the service)", socket)
	}
	removed, err := v.remove()
	if err != nil {
		return fmt.Errorf("remove the %s service: %w", v.platform, err)
	}
	if removed {
		p.say("service", "%s stopped and removed (%s)", ServiceName, v.path)
	} else {
		p.say("service", "%s was not installed", ServiceName)
	}
	switch err := os.Remove(LocalBinary); {
	case err == nil:
		p.say("binary", "%s removed", LocalBinary)
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	if !purge {
		p.say("kept", "table inet %s: this device keeps enforcing its last policy, with no agent to update it", nft.Table)
		p.say("kept", "%s and %s: install again to resume (no token needed); uninstall --purge removes them", ConfigDir, StateDir)
		return nil
	}
	switch removed, err := nft.NewEnforcer().Remove(); {
	case err != nil:
		return fmt.Errorf("remove table inet %s: %w", nft.Table, err)
	case removed:
		p.say("removed", "table inet %s: this device no longer enforces any Bulkhead policy", nft.Table)
	default:
		p.say("absent", "table inet %s: there was none to remove", nft.Table)
	}
	for _, dir := range []struct{ path, what string }{
		{ConfigDir, "configuration and pinned ops keys"},
		{StateDir, "policy cache, enrolment, device and tunnel keys"},
	} {
		if err := os.RemoveAll(dir.path); err != nil {
			return err
		}
		p.say("removed", "%s (%s)", dir.path, dir.what)
	}
	return nil
}
