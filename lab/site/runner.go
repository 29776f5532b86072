package site

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// Runner is the lab.T the demo builds its site with, outside `go test`:
// Fatal stops the scenario running (Run recovers it as a failure),
// Cleanup functions run once, newest first, at Close (also from a signal
// handler), and Logf goes to a log file kept beside the site.
type Runner struct {
	dir string
	log io.Writer

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	temps    int
	closing  sync.Once
}

// fatal is what Runner.Fatal panics with.
type fatal struct{ msg string }

// NewRunner keeps its temporary directories under dir and its log in
// dir/demo.log.
func NewRunner(dir string) (*Runner, error) {
	f, err := os.OpenFile(filepath.Join(dir, "demo.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	r := &Runner{dir: dir, log: f}
	r.Cleanup(func() { f.Close() })
	return r, nil
}

// Helper is nothing here.
func (r *Runner) Helper() {}

// Cleanup registers f to run at Close.
func (r *Runner) Cleanup(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, f)
}

// Fatal fails the run and stops the scenario in progress.
func (r *Runner) Fatal(args ...any) { r.stop(fmt.Sprint(args...)) }

// Fatalf is Fatal with a format.
func (r *Runner) Fatalf(format string, args ...any) { r.stop(fmt.Sprintf(format, args...)) }

// Skip is a failure: the demo has no test to skip, only a site it could
// not build (lab.RequirePrivileged says why).
func (r *Runner) Skip(args ...any) { r.stop(fmt.Sprint(args...)) }

func (r *Runner) stop(msg string) {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
	r.Logf("FATAL %s", msg)
	panic(fatal{msg})
}

// Logf writes to the demo's log.
func (r *Runner) Logf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(r.log, format+"\n", args...)
}

// TempDir makes a new directory under the runner's.
func (r *Runner) TempDir() string {
	r.mu.Lock()
	r.temps++
	n := r.temps
	r.mu.Unlock()
	dir := filepath.Join(r.dir, fmt.Sprintf("tmp%03d", n))
	if err := os.Mkdir(dir, 0o700); err != nil {
		r.stop(err.Error())
	}
	return dir
}

// Failed reports whether anything failed.
func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// Fail marks the run failed without stopping it (a scenario's check
// that did not hold).
func (r *Runner) Fail() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
}

// Close runs the cleanups, newest first, once; a second call (a signal
// during the first) waits for the first to finish.
func (r *Runner) Close() {
	r.closing.Do(func() {
		r.mu.Lock()
		fs := r.cleanups
		r.cleanups = nil
		r.mu.Unlock()
		for i := len(fs) - 1; i >= 0; i-- {
			func() {
				defer func() { recover() }() // a cleanup's Fatal must not stop the rest
				fs[i]()
			}()
		}
	})
}

// Try runs fn, turning a Fatal inside it into an error.
func (r *Runner) Try(fn func()) (err error) {
	defer func() {
		if v := recover(); v != nil {
			f, ok := v.(fatal)
			if !ok {
				panic(v)
			}
			err = fmt.Errorf("%s", f.msg)
		}
	}()
	fn()
	return nil
}
