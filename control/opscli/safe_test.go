package opscli

import "testing"

// What a device reports cannot forge a row or drive the terminal: every
// control character, and the bidirectional overrides, come out escaped;
// ordinary text, accents included, comes out as it was.
func TestSafeEscapesControls(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"quarantine: INC-231", "quarantine: INC-231"},
		{"Zürich depot", "Zürich depot"},
		{"ok\r\ndev-evil\tscanner\tnormal", `ok\x0d\x0adev-evil\x09scanner\x09normal`},
		{"\x1b[2J\x1b]0;pwned\x07", `\x1b[2J\x1b]0;pwned\x07`},
		{"\u202eevil", `\u202eevil`},
		{"\u009bm", `\x9bm`},
		{"\x7f", `\x7f`},
	} {
		if got := safe(tt.in); got != tt.want {
			t.Errorf("safe(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
