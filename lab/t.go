package lab

// T is what the lab needs from whoever builds a site: *testing.T and
// *testing.B have it, and so has the demo's runner (package lab/site),
// so `make demo` builds its site with the same code the tests do.
type T interface {
	Helper()
	Cleanup(func())
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Skip(args ...any)
	TempDir() string
	Failed() bool
}
