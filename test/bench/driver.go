package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/test/csiclient"
)

// nodeID is the node every driver of the bench serves.
const nodeID = "bench-node"

// stopTimeout bounds how long a driver may take to stop after SIGTERM before
// it is killed.
const stopTimeout = 30 * time.Second

// driverProc is a bin/spool child process serving one pool.
type driverProc struct {
	name     string
	endpoint string
	sock     string
	logPath  string
	cmd      *exec.Cmd
	started  time.Time     // just before fork/exec: start-up is measured from here
	logStart int64         // size of the log before this process wrote to it
	done     chan struct{} // closed when the process has exited
	waitErr  error         // valid once done is closed
	peakRSS  int64         // VmHWM in bytes, read just before the process was told to stop
}

// startDriver starts bin/spool with its socket and log in dir, serving the
// pool directory poolDir as pool "default".
func startDriver(bin, name, dir, poolDir string) (*driverProc, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("starting %s driver: %w", name, err)
	}
	sock := filepath.Join(dir, "csi.sock")
	// A socket left by a process that was killed would make the readiness
	// check below talk to nobody; the driver replaces it anyway.
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("starting %s driver: %w", name, err)
	}
	logPath := filepath.Join(dir, "spool.log")
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("starting %s driver: %w", name, err)
	}
	d := &driverProc{name: name, endpoint: "unix://" + sock, sock: sock, logPath: logPath, done: make(chan struct{})}
	if fi, err := logFile.Stat(); err == nil {
		d.logStart = fi.Size()
	}
	d.cmd = exec.Command(bin, "--endpoint", d.endpoint, "--node-id", nodeID, "--pool", "default="+poolDir, "-v", "0")
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile
	d.cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a Ctrl-C in the terminal reaches only the
		// bench, which then unstages through the still-running driver
		// before stopping it.
		Setpgid: true,
		// If the bench itself is killed, the driver gets SIGTERM rather
		// than lingering with the pool locked.
		Pdeathsig: syscall.SIGTERM,
	}
	d.started = time.Now()
	if err := d.cmd.Start(); err != nil {
		_ = logFile.Close()
		return nil, fmt.Errorf("starting %s driver: %w", name, err)
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		_ = logFile.Close()
		close(d.done)
	}()
	return d, nil
}

func (d *driverProc) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// waitReady waits for the first Probe that answers ready and returns the
// time since the process was started.
func (d *driverProc) waitReady(ctx context.Context, limit time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(limit)
	for {
		if d.exited() {
			return 0, fmt.Errorf("%s driver exited during start (%v); log: %s", d.name, d.waitErr, d.logTail())
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s driver not ready within %v; log: %s", d.name, limit, d.logTail())
		}
		// Dialling only once the socket exists keeps gRPC's reconnect
		// backoff (a second or more) out of the measurement.
		if _, err := os.Stat(d.sock); err == nil && d.probe(ctx) {
			return time.Since(d.started), nil
		}
		time.Sleep(time.Millisecond)
	}
}

// probe makes one Probe call on a fresh connection.
func (d *driverProc) probe(ctx context.Context) bool {
	c, err := csiclient.Dial(d.endpoint)
	if err != nil {
		return false
	}
	defer func() { _ = c.Close() }()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := c.Probe(ctx, &csi.ProbeRequest{})
	return err == nil && resp.GetReady().GetValue()
}

// stop sends SIGTERM and waits for the driver to exit (killing it after
// stopTimeout). It records the process's peak RSS first.
func (d *driverProc) stop() error {
	if d.exited() {
		return d.exitErr()
	}
	if st, err := d.status(); err == nil {
		d.peakRSS = st.hwm
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stopping %s driver: %w", d.name, err)
	}
	select {
	case <-d.done:
	case <-time.After(stopTimeout):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("%s driver did not stop within %v of SIGTERM and was killed; log: %s", d.name, stopTimeout, d.logTail())
	}
	return d.exitErr()
}

func (d *driverProc) exitErr() error {
	if d.waitErr != nil {
		return fmt.Errorf("%s driver exited with %w; log: %s", d.name, d.waitErr, d.logTail())
	}
	return nil
}

// logTail returns the last lines of the driver's log, for error messages.
func (d *driverProc) logTail() string {
	data, err := os.ReadFile(d.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " / ")
}

// logEvent finds the first line this process logged with the message msg
// and returns when it was logged, relative to the process start. klog
// prefixes each line with "Lmmdd hh:mm:ss.uuuuuu"; structured messages are
// quoted.
func (d *driverProc) logEvent(msg string) (time.Duration, bool) {
	data, err := os.ReadFile(d.logPath)
	if err != nil || int64(len(data)) < d.logStart {
		return 0, false
	}
	for _, line := range strings.Split(string(data[d.logStart:]), "\n") {
		if !strings.Contains(line, `] "`+msg+`"`) || len(line) < 21 {
			continue
		}
		t, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
		if err != nil {
			return 0, false
		}
		t = t.AddDate(d.started.Year(), 0, 0)
		return t.Sub(d.started), true
	}
	return 0, false
}

// procStatus is what the bench reads from /proc/PID/status.
type procStatus struct {
	hwm, rss int64 // VmHWM and VmRSS, bytes
}

func (d *driverProc) status() (procStatus, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		return procStatus{}, fmt.Errorf("reading status of %s driver: %w", d.name, err)
	}
	var st procStatus
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch key {
		case "VmHWM":
			st.hwm, err = parseKB(val)
		case "VmRSS":
			st.rss, err = parseKB(val)
		}
		if err != nil {
			return procStatus{}, fmt.Errorf("status of %s driver: %s: %w", d.name, key, err)
		}
	}
	if st.hwm == 0 || st.rss == 0 {
		return procStatus{}, fmt.Errorf("status of %s driver: no VmHWM/VmRSS", d.name)
	}
	return st, nil
}

// parseKB parses "  12345 kB".
func parseKB(s string) (int64, error) {
	n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(s), " kB"), 10, 64)
	return n << 10, err
}

// cpuTime is the CPU time, in seconds, of the driver and of the programs it
// ran and waited for (mkfs, blkid, mount...).
type cpuTime struct{ self, children float64 }

// cpuTimes reads the driver's CPU times from /proc/PID/stat.
func (d *driverProc) cpuTimes() (cpuTime, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.cmd.Process.Pid))
	if err != nil {
		return cpuTime{}, fmt.Errorf("reading stat of %s driver: %w", d.name, err)
	}
	// The command name (field 2) may hold spaces; fields are counted
	// after its closing parenthesis. utime, stime, cutime and cstime are
	// fields 14 to 17.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return cpuTime{}, fmt.Errorf("stat of %s driver: unexpected format", d.name)
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 15 {
		return cpuTime{}, fmt.Errorf("stat of %s driver: unexpected format", d.name)
	}
	var ticks [4]float64
	for k := range ticks {
		n, err := strconv.ParseInt(f[11+k], 10, 64)
		if err != nil {
			return cpuTime{}, fmt.Errorf("stat of %s driver: %w", d.name, err)
		}
		ticks[k] = float64(n) / clockTicks
	}
	return cpuTime{self: ticks[0] + ticks[1], children: ticks[2] + ticks[3]}, nil
}

// cpuSeconds returns the CPU time (user + system) the driver has used.
func (d *driverProc) cpuSeconds() (float64, error) {
	t, err := d.cpuTimes()
	return t.self, err
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every
// Linux architecture Spool runs on.
const clockTicks = 100
