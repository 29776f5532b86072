package localpolicy

import "fmt"

// Mode is a device's enforcement mode. Modes are ordered: when several
// apply, the most restrictive wins.
type Mode int

// The modes, least restrictive first.
const (
	Normal Mode = iota
	Restricted
	Offline
	Diagnostic
	Quarantine
	Lockdown
)

var modeNames = [...]string{"normal", "restricted", "offline", "diagnostic", "quarantine", "lockdown"}

func (m Mode) String() string {
	if m < 0 || int(m) >= len(modeNames) {
		return fmt.Sprintf("mode(%d)", int(m))
	}
	return modeNames[m]
}

// ParseMode reads a mode name.
func ParseMode(s string) (Mode, error) {
	for i, n := range modeNames {
		if n == s {
			return Mode(i), nil
		}
	}
	return 0, fmt.Errorf("unknown mode %q (want one of %v)", s, modeNames)
}

// MarshalText writes the mode's name.
func (m Mode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText reads a mode's name.
func (m *Mode) UnmarshalText(b []byte) error {
	v, err := ParseMode(string(b))
	*m = v
	return err
}
