// Package subcmd owns how Bulkhead's binaries read their command lines:
// nested subcommands with per-command flags and help, repeatable flags,
// and exit codes (0 success, 1 the operation failed, 2 the command line was
// wrong). Errors print as one line prefixed with the program name.
package subcmd

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// Command is one subcommand, or a group of them.
type Command struct {
	Name    string
	Args    string // synopsis after the flags, e.g. "BUNDLE"
	Summary string
	// Flags declares the command's flags on fs and returns the function that
	// runs it with the remaining arguments.
	Flags func(fs *flag.FlagSet) func(env *Env, args []string) error
	Sub   []*Command
}

// Env is what a command may touch.
type Env struct {
	Stdout, Stderr io.Writer
}

// UsageError marks a wrong command line (exit status 2).
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// Usagef returns a UsageError.
func Usagef(format string, args ...any) error {
	return &UsageError{Msg: fmt.Sprintf(format, args...)}
}

// Main runs root with the process's arguments and standard streams and
// returns the exit status for os.Exit.
func Main(root *Command) int {
	return Run(root, os.Args[1:], &Env{Stdout: os.Stdout, Stderr: os.Stderr})
}

// Run executes the command line args (without the program name) against
// root and returns the process exit status.
func Run(root *Command, args []string, env *Env) int {
	err := run(root, root.Name, args, env)
	var uerr *UsageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &uerr):
		fmt.Fprintf(env.Stderr, "%s: %s\n", root.Name, oneLine(uerr.Msg))
		return 2
	default:
		fmt.Fprintf(env.Stderr, "%s: %s\n", root.Name, oneLine(err.Error()))
		return 1
	}
}

func run(c *Command, path string, args []string, env *Env) error {
	if len(c.Sub) > 0 {
		if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
			printGroup(c, path, env.Stdout)
			if len(args) == 0 {
				return Usagef("%s needs a command; see above", path)
			}
			return flag.ErrHelp
		}
		for _, s := range c.Sub {
			if s.Name == args[0] {
				return run(s, path+" "+s.Name, args[1:], env)
			}
		}
		return Usagef("unknown command %q for %s (try '%s --help')", args[0], path, path)
	}
	fs := flag.NewFlagSet(path, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	do := c.Flags(fs)
	fs.Usage = func() {}
	// Flags may follow arguments (`quarantine dev-1 --reason x`): parse,
	// set the next argument aside, and parse again.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printCommand(c, path, fs, env.Stdout)
				return err
			}
			return Usagef("%s (try '%s --help')", err, path)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
	return do(env, positional)
}

func printGroup(c *Command, path string, w io.Writer) {
	if c.Summary != "" {
		fmt.Fprintf(w, "%s\n\n", c.Summary)
	}
	fmt.Fprintf(w, "Usage: %s COMMAND [flags]\n\nCommands:\n", path)
	width := 12
	for _, s := range c.Sub {
		width = max(width, len(s.Name))
	}
	for _, s := range c.Sub {
		first, _, _ := strings.Cut(s.Summary, "\n")
		fmt.Fprintf(w, "  %-*s %s\n", width, s.Name, first)
	}
	fmt.Fprintf(w, "\nRun '%s COMMAND --help' for a command's flags.\n", path)
}

func printCommand(c *Command, path string, fs *flag.FlagSet, w io.Writer) {
	fmt.Fprintf(w, "%s\n\nUsage: %s [flags] %s\n", c.Summary, path, c.Args)
	var b strings.Builder
	fs.SetOutput(&b)
	fs.PrintDefaults()
	if b.Len() > 0 {
		fmt.Fprintf(w, "\nFlags:\n%s", b.String())
	}
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// Strings is a flag that may be given more than once.
type Strings []string

func (s *Strings) String() string { return strings.Join(*s, ",") }

// Set appends one value.
func (s *Strings) Set(v string) error {
	*s = append(*s, v)
	return nil
}
