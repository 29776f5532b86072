package lab

import (
	"os"
)

// Process is a long-running command in a namespace (an agent, say), its
// output appended to a log file.
type Process struct {
	proc *os.Process
	done chan struct{}
}

// StartProcess starts argv in ns with its output appended to log.
func StartProcess(ns *NS, log string, argv ...string) (*Process, error) {
	cmd := ns.Command(argv...)
	logf, err := os.OpenFile(log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p := &Process{proc: cmd.Process, done: make(chan struct{})}
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	return p, nil
}

// Kill stops the process as a crash or a power cut would, and waits for
// it. A nil Process is already stopped.
func (p *Process) Kill() {
	if p != nil {
		p.proc.Kill()
		<-p.done
	}
}

// PID is the process id.
func (p *Process) PID() int { return p.proc.Pid }
