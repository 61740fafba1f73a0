package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/doctor"
	"github.com/spool-csi/spool/pkg/loop"
)

const doctorUsage = `Usage: spool doctor [--pool NAME=DIR[,shared] ...] [--kubelet-dir DIR] [-o text|json]

Checks that this node has what Spool needs, one line per check with a
verdict (ok, warn, fail) and, when it is not ok, a fix: loop devices, each
filesystem and its tools, each pool (the lock, space, leftovers, reflink,
direct I/O), the kubelet directory's mount propagation, CAP_SYS_RESOURCE,
and loop devices whose pool image was deleted. Run it on the node, or in
the node pod (kubectl -n spool-system exec <pod> -c spool -- spool doctor
--pool default=/var/lib/spool/default). Exit status 1 when a check fails
(volumes cannot be served as configured), 0 otherwise, 2 on a usage error.

`

// Doctor runs `spool doctor`.
func Doctor(args []string, stdout, stderr io.Writer) int {
	return doctorWith(args, stdout, stderr, hostSystem())
}

func doctorWith(args []string, stdout, stderr io.Writer, sys doctor.System) int {
	var cfg doctor.Config
	var output string
	fl := flag.NewFlagSet("spool doctor", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, doctorUsage); fl.PrintDefaults() }
	fl.Var(&cfg.Pools, "pool", "pool NAME=DIR[,shared], as given to the driver; repeat for more pools")
	fl.StringVar(&cfg.KubeletDir, "kubelet-dir", "/var/lib/kubelet", "the kubelet's root directory")
	fl.StringVar(&output, "o", "text", "output: text or json")
	pos, err := parse(fl, args)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		return exitUsage
	}
	if len(pos) > 0 || (output != "text" && output != "json") {
		fmt.Fprintf(stderr, "spool doctor: unexpected argument or -o %q\n\n%s", output, doctorUsage)
		return exitUsage
	}
	setupLogging(-1) // the pools' own log lines would only interleave
	results := doctor.Run(context.Background(), sys, cfg)
	if output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(results); err != nil {
			fmt.Fprintf(stderr, "spool doctor: %v\n", err)
			return exitError
		}
	} else {
		doctor.Print(stdout, results)
	}
	if doctor.Failed(results) {
		return exitError
	}
	return exitOK
}

// hostSystem is this machine, as the driver sees it.
func hostSystem() doctor.System {
	return doctor.System{
		ProcFilesystems: "/proc/filesystems",
		MountInfo:       "/proc/self/mountinfo",
		Status:          "/proc/self/status",
		Locks:           "/proc/locks",
		LoopControl:     freeLoop,
		LookPath:        exec.LookPath,
		Version:         toolVersion,
		Loops: func() ([]string, error) {
			devs, err := loop.List()
			if err != nil {
				return nil, err
			}
			files := make([]string, 0, len(devs))
			for _, d := range devs {
				f := d.BackingFile
				if d.Deleted {
					f += " (deleted)"
				}
				files = append(files, f)
			}
			return files, nil
		},
	}
}

// freeLoop asks /dev/loop-control for a free loop device; it names one and
// reserves nothing.
func freeLoop() (string, error) {
	f, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	n, err := unix.IoctlRetInt(int(f.Fd()), unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return "", fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
	}
	return fmt.Sprintf("/dev/loop%d", n), nil
}

// toolVersion is the first line a tool prints about its version.
func toolVersion(ctx context.Context, path string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, path, args...).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}
