package lab

import "time"

// Until polls cond every 10 ms until it holds or d has passed since the
// call, and says how long after start it first held (or when it gave up).
// It is the one polling loop of the tests, the demo and the bench: what
// is measured is start to the first poll that saw cond, so a figure is
// never shorter than what it measures.
func Until(start time.Time, d time.Duration, cond func() bool) (time.Duration, bool) {
	for deadline := time.Now().Add(d); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return time.Since(start), true
		}
		if time.Now().After(deadline) {
			return time.Since(start), false
		}
	}
}

// WaitFor fails t unless cond holds within d.
func WaitFor(t T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	if _, ok := Until(time.Now(), d, cond); !ok {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

// Within reports whether cond holds within d.
func Within(d time.Duration, cond func() bool) bool {
	_, ok := Until(time.Now(), d, cond)
	return ok
}
