package posture

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxWatchedPIDs caps the processes one Watch follows (a required name
// may match a server's worker pool).
const maxWatchedPIDs = 64

// Watch arms change notification for what sample f showed of the facts w
// names: the exit of every running process a check requires (a pidfd
// each) and any change to a file a check pins (inotify on the file and
// on its directory, for replacement and creation). The channel receives
// one line saying what changed, once; stop releases everything and may be
// called any number of times. A fact it cannot watch (no pidfd support, a
// directory that does not exist) is seen at the next timed sample, as
// before. The waits sit in the runtime's poller: no thread is held.
func Watch(w Wants, f *Facts) (changed <-chan string, stop func()) {
	ch := make(chan string, 1)
	fire := func(why string) {
		select {
		case ch <- why:
		default:
		}
	}
	var files []*os.File
	var wg sync.WaitGroup
	wait := func(fd int, name string, ready func(*os.File) (string, bool)) {
		file := os.NewFile(uintptr(fd), name)
		files = append(files, file)
		wg.Go(func() {
			if why, ok := ready(file); ok {
				fire(why)
			}
		})
	}
	if f != nil {
		n := 0
		for _, p := range f.Processes {
			if !slices.Contains(w.Required, p.Name) || n == maxWatchedPIDs {
				continue
			}
			n++
			why := fmt.Sprintf("process %s (pid %d) exited", p.Name, p.PID)
			fd, err := unix.PidfdOpen(int(p.PID), unix.PIDFD_NONBLOCK)
			if errors.Is(err, unix.ESRCH) {
				fire(why) // gone since the sample
				continue
			}
			if err != nil {
				continue
			}
			wait(fd, "pidfd", func(file *os.File) (string, bool) { return why, exited(file) })
		}
	}
	if len(w.Files) > 0 {
		if fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK); err == nil {
			pinned, dirs := map[int]string{}, map[int]string{} // by watch descriptor
			for _, p := range w.Files {
				if wd, err := unix.InotifyAddWatch(fd, p, unix.IN_MODIFY|unix.IN_ATTRIB|unix.IN_CLOSE_WRITE|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF); err == nil {
					pinned[wd] = p
				}
				if wd, err := unix.InotifyAddWatch(fd, filepath.Dir(p), unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_MOVED_FROM|unix.IN_DELETE|unix.IN_CLOSE_WRITE); err == nil {
					dirs[wd] = filepath.Dir(p)
				}
			}
			wait(fd, "inotify", func(file *os.File) (string, bool) { return fileEvent(file, w.Files, pinned, dirs) })
		}
	}
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			for _, file := range files {
				file.Close() // wakes its waiter with os.ErrClosed
			}
			wg.Wait()
		})
	}
}

// exited waits until a pidfd's process exits (the pidfd turns readable)
// or the file is closed; it reports which.
func exited(file *os.File) bool {
	rc, err := file.SyscallConn()
	if err != nil {
		return false
	}
	var gone bool
	err = rc.Read(func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		gone = err == nil && n == 1
		return gone
	})
	return err == nil && gone
}

// fileEvent reads inotify events until one concerns a pinned file (an
// event on the file itself, or on its name in its directory), or the
// file is closed.
func fileEvent(file *os.File, files []string, pinned, dirs map[int]string) (string, bool) {
	buf := make([]byte, 4096)
	for {
		n, err := file.Read(buf)
		if err != nil {
			return "", false
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+unix.SizeofInotifyEvent : min(n, off+unix.SizeofInotifyEvent+int(ev.Len))]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if p, ok := pinned[int(ev.Wd)]; ok {
				return "file " + p + " changed", true
			}
			if dir, ok := dirs[int(ev.Wd)]; ok {
				if i := bytes.IndexByte(name, 0); i >= 0 {
					name = name[:i] // names are NUL-padded
				}
				if p := filepath.Join(dir, string(name)); slices.ContainsFunc(files, func(f string) bool { return filepath.Clean(f) == p }) {
					return "file " + p + " changed", true
				}
			}
		}
	}
}
