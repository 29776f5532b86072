// Package pgrun runs a throwaway PostgreSQL cluster from Debian's
// postgresql package, for tests and the lab: initdb into a fresh
// directory, pg_ctl to start, stop and restart it, as an unprivileged
// user when the caller is root (PostgreSQL refuses to run as root). It
// listens on a Unix socket in its directory, and on TCP when asked. It is
// a test fixture, not a way to run production databases.
package pgrun

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrNotInstalled says Debian's postgresql package is missing.
var ErrNotInstalled = errors.New("PostgreSQL is not installed (apt-get install postgresql)")

// Options are how a cluster runs.
type Options struct {
	// Listen is a TCP address to listen on as well, host or host:port
	// (empty: the Unix socket only).
	Listen string
	// Netns, when set, runs the server in that named network namespace
	// (ip netns exec).
	Netns string
}

// Cluster is a running cluster.
type Cluster struct {
	Dir  string
	bin  string
	opts Options
	cred *syscall.Credential
	port int
}

// BinDir finds the newest installed PostgreSQL's programs.
func BinDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return version(a) - version(b) })
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", ErrNotInstalled
}

func version(dir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return n
}

// Start makes a cluster in a new directory under parent (the system's
// temporary directory when empty) and starts it. The superuser is
// "bulkhead", trusted without a password: a fixture, never a service.
func Start(ctx context.Context, parent string, opts Options) (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(parent, "bulkhead-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, bin: bin, opts: opts, port: 5432}
	if opts.Listen != "" {
		if _, p, err := splitHostPort(opts.Listen); err != nil {
			return nil, err
		} else if p != 0 {
			c.port = p
		}
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			u, err = user.Lookup("nobody")
		}
		if err != nil {
			return nil, fmt.Errorf("postgres runs as an unprivileged user, and neither postgres nor nobody exists: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
	}
	if out, err := c.run(ctx, "initdb", "-D", c.data(), "-U", "bulkhead", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"); err != nil {
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	// A commit is in the WAL when it is acknowledged (synchronous_commit,
	// the default), so killing the server loses nothing committed, as in
	// production; only fsync is off: the machine itself never crashes.
	conf := "fsync = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n"
	if opts.Listen != "" {
		host, _, _ := splitHostPort(opts.Listen)
		conf += "listen_addresses = '" + host + "'\n"
		if err := appendFile(filepath.Join(c.data(), "pg_hba.conf"), "host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n"); err != nil {
			return nil, err
		}
	} else {
		conf += "listen_addresses = ''\n"
	}
	conf += fmt.Sprintf("unix_socket_directories = '%s'\nport = %d\n", dir, c.port)
	if err := appendFile(filepath.Join(c.data(), "postgresql.conf"), conf); err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

func splitHostPort(s string) (string, int, error) {
	i := strings.LastIndex(s, ":")
	if i < 0 || strings.HasSuffix(s, "]") {
		return strings.Trim(s, "[]"), 0, nil
	}
	p, err := strconv.Atoi(s[i+1:])
	if err != nil {
		return "", 0, fmt.Errorf("listen %q: port: %w", s, err)
	}
	return strings.Trim(s[:i], "[]"), p, nil
}

func appendFile(path, text string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(text)
	return errors.Join(err, f.Close())
}

func (c *Cluster) data() string { return filepath.Join(c.Dir, "data") }

func (c *Cluster) run(ctx context.Context, prog string, args ...string) ([]byte, error) {
	name := filepath.Join(c.bin, prog)
	cred := c.cred
	if c.opts.Netns != "" {
		// Entering the namespace takes root; the user is dropped after,
		// by setpriv (util-linux).
		if cred != nil {
			args = append([]string{"--reuid", strconv.Itoa(int(cred.Uid)), "--regid", strconv.Itoa(int(cred.Gid)), "--clear-groups", name}, args...)
			name, cred = "setpriv", nil
		}
		args = append([]string{"netns", "exec", c.opts.Netns, name}, args...)
		name = "ip"
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = c.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	return cmd.CombinedOutput()
}

// Start starts the stopped cluster and waits until it accepts
// connections.
func (c *Cluster) Start(ctx context.Context) error {
	if out, err := c.run(ctx, "pg_ctl", "-D", c.data(), "-l", filepath.Join(c.Dir, "log"), "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(c.Dir, "log"))
		return fmt.Errorf("pg_ctl start: %w: %s\n%s", err, out, log)
	}
	return nil
}

// Stop stops the cluster: fast (connections are cut, the server shuts
// down cleanly) or, with immediate, as a crash would.
func (c *Cluster) Stop(ctx context.Context, immediate bool) error {
	mode := "fast"
	if immediate {
		mode = "immediate"
	}
	if out, err := c.run(ctx, "pg_ctl", "-D", c.data(), "-m", mode, "-w", "stop"); err != nil {
		return fmt.Errorf("pg_ctl stop: %w: %s", err, out)
	}
	return nil
}

// Close stops the cluster and removes its directory.
func (c *Cluster) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := c.Stop(ctx, true)
	return errors.Join(err, os.RemoveAll(c.Dir))
}

// URL is the address of database db on the Unix socket, for pgx.
func (c *Cluster) URL(db string) string {
	q := url.Values{"host": {c.Dir}, "port": {strconv.Itoa(c.port)}}
	return (&url.URL{Scheme: "postgres", User: url.User("bulkhead"), Path: "/" + db, RawQuery: q.Encode()}).String()
}

// TCPURL is the address of database db over TCP at host (Options.Listen's
// host, or another that reaches it).
func (c *Cluster) TCPURL(host, db string) string {
	return (&url.URL{Scheme: "postgres", User: url.User("bulkhead"), Host: net.JoinHostPort(host, strconv.Itoa(c.port)), Path: "/" + db}).String()
}

// CreateDB makes an empty database.
func (c *Cluster) CreateDB(ctx context.Context, name string) error {
	if out, err := c.run(ctx, "createdb", "-h", c.Dir, "-p", strconv.Itoa(c.port), "-U", "bulkhead", name); err != nil {
		return fmt.Errorf("createdb %s: %w: %s", name, err, out)
	}
	return nil
}
