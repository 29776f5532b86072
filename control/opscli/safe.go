package opscli

import (
	"fmt"
	"strings"
)

// safe renders text a device or an unauthenticated caller supplied (a
// mode's reason, a hostname, a report) for a terminal. Control characters
// are written as escapes, so no such text can forge a row of a table,
// move the cursor, retitle the window or reorder what follows: ESC and
// the other C0 and C1 controls, DEL, and the Unicode bidirectional
// overrides and isolates.
func safe(s string) string {
	if !strings.ContainsFunc(s, unsafeRune) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case !unsafeRune(r):
			b.WriteRune(r)
		case r < 0x100:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
	}
	return b.String()
}

func unsafeRune(r rune) bool {
	return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) ||
		(r >= 0x202a && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069) || r == 0x200e || r == 0x200f || r == 0x061c
}
