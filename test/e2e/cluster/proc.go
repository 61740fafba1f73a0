package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Proc is one host process of the cluster, its output in a log file. It runs
// in its own process group, so Stop also ends the children it started.
type Proc struct {
	Name string
	Log  string
	args []string
	env  []string

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	restarts int
	stopped  bool
}

// start launches the process once.
func (p *Proc) start() error {
	f, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open log of %s: %w", p.Name, err)
	}
	cmd := exec.Command(p.args[0], p.args[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), p.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(f, "=== %s: %q\n", time.Now().Format(time.RFC3339Nano), p.args)
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	}()
	p.cmd, p.done = cmd, done
	return nil
}

// StartProc runs the process once; Stop ends it.
func StartProc(name, logDir string, env []string, args ...string) (*Proc, error) {
	p := &Proc{Name: name, Log: filepath.Join(logDir, name+".log"), args: args, env: env}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.start(); err != nil {
		return nil, err
	}
	return p, nil
}

// Supervise runs the process and starts it again whenever it exits, after a
// short pause, until Stop. The CSI sidecars exit when the driver's socket
// goes away; a supervisor is what restarts them in a real pod.
func Supervise(name, logDir string, env []string, args ...string) (*Proc, error) {
	p, err := StartProc(name, logDir, env, args...)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			p.mu.Lock()
			done := p.done
			p.mu.Unlock()
			<-done
			time.Sleep(time.Second)
			p.mu.Lock()
			if p.stopped {
				p.mu.Unlock()
				return
			}
			p.restarts++
			if err := p.start(); err != nil {
				p.stopped = true
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
		}
	}()
	return p, nil
}

// PID is the process ID of the running instance.
func (p *Proc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// Restarts counts how often a supervised process was started again.
func (p *Proc) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}

// Exited reports whether the current instance has ended.
func (p *Proc) Exited() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM to the process group, waits up to grace, then kills it.
func (p *Proc) Stop(grace time.Duration) error {
	p.mu.Lock()
	p.stopped = true
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	select {
	case <-done:
		return nil
	default:
	}
	pgid := cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case <-done:
		return fmt.Errorf("%s (pid %d) did not stop within %s and was killed", p.Name, pgid, grace)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survived SIGKILL", p.Name, pgid)
	}
}

// Kill ends the process group at once with SIGKILL, as a crash would.
func (p *Proc) Kill() error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survived SIGKILL", p.Name, cmd.Process.Pid)
	}
}

// run runs a command to completion and returns its combined output.
func run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(out), fmt.Errorf("%q: %w: %s", args, err, out)
		}
		return string(out), fmt.Errorf("%q: %w", args, err)
	}
	return string(out), nil
}

// waitFor polls check every interval until it returns nil or the timeout
// passes; the error names what was awaited and the last failure.
func waitFor(ctx context.Context, what string, timeout, interval time.Duration, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		var stop stopWaiting
		if errors.As(last, &stop) {
			return fmt.Errorf("%s: %w", what, stop.error)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not ready after %s: %w", what, timeout, last)
		case <-time.After(interval):
		}
	}
}
