package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
)

// dropped is one file read from the drop directory, handed to the loop:
// the loop installs raw (unless err says why it could not be read) and
// answers on verdict; the watcher then removes the file, or renames a
// refused one *.rejected so it is not retried (and audited) every second.
type dropped struct {
	path    string
	raw     []byte
	err     error
	verdict chan error
}

// watchDrops scans dir every period until ctx ends and hands each *.dsse
// file to out. Reading files is done here, never on the event loop: a
// file that blocks (a FIFO, a hung mount) stalls this goroutine, not the
// agent's table, status or drift repair. A file modified within the last
// period may still be being copied in (cp writes in place), so it waits
// for the next scan instead of being judged half-written.
func watchDrops(ctx context.Context, dir string, period time.Duration, wall func() time.Time, out chan<- dropped) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		entries, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range entries {
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".dsse") {
				continue
			}
			if info, err := e.Info(); err != nil || wall().Sub(info.ModTime()) < period {
				continue
			}
			path := filepath.Join(dir, e.Name())
			raw, err := readDropFile(path)
			f := dropped{path: path, raw: raw, err: err, verdict: make(chan error, 1)}
			select {
			case out <- f:
			case <-ctx.Done():
				return
			}
			var verdict error
			select {
			case verdict = <-f.verdict:
			case <-ctx.Done():
				return
			}
			if verdict != nil {
				os.Rename(path, path+".rejected")
				continue
			}
			os.Remove(path)
		}
	}
}

// readDropFile reads a regular file with the envelope cap. It does not
// follow a symbolic link, and opening does not wait: a FIFO or a device
// is refused, not read.
func readDropFile(path string) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("%s: a symbolic link; copy the bundle itself into the drop directory", path)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, info.Mode().Type())
	}
	raw, err := envelope.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return raw, nil
}
