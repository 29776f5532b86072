package installer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kardianos/service"
)

// ServiceName is the service's name under every init system.
const ServiceName = "bulkhead"

// svc is the agent's service under the init system this host runs, with
// the script Bulkhead writes for it.
type svc struct {
	service.Service
	platform string
	path     string // where the init system reads the script
	script   string
}

// newService picks the host's init system. The script is rendered here,
// not by kardianos's template engine: it holds no template actions, so
// the file written is exactly script, and installing again can compare.
func newService(binary string) (*svc, error) {
	cfg := &service.Config{
		Name:        ServiceName,
		DisplayName: "Bulkhead",
		Description: "Bulkhead zero-trust edge agent",
		Executable:  binary,
		Arguments:   []string{"run", "--config", ConfigFile},
		Option: service.KeyValue{
			"SystemdScript": SystemdUnit(binary),
			"OpenRCScript":  OpenRCScript(binary),
			"SysvScript":    SysVScript(binary),
		},
	}
	s, err := service.New(noProgram{}, cfg)
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	v := &svc{Service: s, platform: s.Platform()}
	switch v.platform {
	case "linux-systemd":
		v.path, v.script = "/etc/systemd/system/"+ServiceName+".service", SystemdUnit(binary)
	case "linux-openrc":
		v.path, v.script = "/etc/init.d/"+ServiceName, OpenRCScript(binary)
	case "unix-systemv":
		v.path, v.script = "/etc/init.d/"+ServiceName, SysVScript(binary)
	default:
		return nil, fmt.Errorf("this host runs %s; Bulkhead installs as a systemd, OpenRC or SysV service", v.platform)
	}
	return v, nil
}

func (v *svc) name() string { return ServiceName }

// install writes the script and registers the service, unless exactly
// this script is installed already.
func (v *svc) install() (bool, error) {
	old, err := os.ReadFile(v.path)
	if err == nil && string(old) == v.script {
		return false, nil
	}
	if err == nil {
		if err := v.Uninstall(); err != nil {
			return false, fmt.Errorf("replace %s: %w", v.path, err)
		}
	}
	if err := v.Install(); err != nil {
		return false, fmt.Errorf("install the %s service: %w", v.platform, err)
	}
	return true, nil
}

// remove unregisters the service and deletes its script, and for SysV
// the runlevel links kardianos leaves behind.
func (v *svc) remove() (bool, error) {
	if _, err := os.Stat(v.path); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err := v.Uninstall(); err != nil {
		return false, err
	}
	if v.platform == "unix-systemv" {
		links, _ := filepath.Glob("/etc/rc?.d/[SK][0-9][0-9]" + ServiceName)
		for _, l := range links {
			if dest, err := os.Readlink(l); err == nil && dest == v.path {
				os.Remove(l)
			}
		}
	}
	return true, nil
}

func (v *svc) statusHint() string {
	switch v.platform {
	case "linux-systemd":
		return "systemctl status " + ServiceName + "   (log: journalctl -u " + ServiceName + ")"
	case "linux-openrc":
		return "rc-service " + ServiceName + " status   (log: /var/log/bulkhead.log)"
	default:
		return "service " + ServiceName + " status   (log: /var/log/bulkhead.log)"
	}
}

func (v *svc) logHint() string {
	if v.platform == "linux-systemd" {
		return "journalctl -u " + ServiceName
	}
	return "/var/log/bulkhead.log"
}

// noProgram satisfies kardianos's interface: the agent's own `run` is the
// program; the installer only installs, starts and stops it.
type noProgram struct{}

func (noProgram) Start(service.Service) error { return nil }
func (noProgram) Stop(service.Service) error  { return nil }
