package main

import "testing"

func TestDebVersion(t *testing.T) {
	for in, want := range map[string]string{
		"v1.2.0":            "1.2.0",
		"v1.2.0-3-gabc1234": "1.2.0.3.gabc1234",
		"8a97a0f":           "0.0.0~git8a97a0f",
		"817a1e8-dirty":     "0.0.0~git817a1e8.dirty",
		"dev":               "0.0.0~gitdev",
	} {
		if got := debVersion(in); got != want {
			t.Errorf("debVersion(%q) = %q, want %q", in, got, want)
		}
	}
}
