package main

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/loop"
)

// cleanups is a stack of undo steps, run last in, first out, so that a
// driver is stopped before the filesystem holding its pool is unmounted and
// that filesystem is unmounted before its loop device is detached.
type cleanups struct {
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (c *cleanups) add(what string, fn func() error) {
	c.steps = append(c.steps, cleanupStep{what, fn})
}

// run runs every step, newest first, even when some fail, and empties the
// stack.
func (c *cleanups) run() error {
	var errs []error
	for i := len(c.steps) - 1; i >= 0; i-- {
		if err := c.steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.steps[i].what, err))
		}
	}
	c.steps = nil
	return errors.Join(errs...)
}

// under reports whether path is dir or lies below it.
func under(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// mountsUnder lists the mount points under dir, deepest first, a stacked
// mount point once per mount.
func mountsUnder(dir string) ([]string, error) {
	all, err := fs.Mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range all {
		if under(m.MountPoint, dir) {
			out = append(out, m.MountPoint)
		}
	}
	slices.SortStableFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out, nil
}

// loopsUnder lists the loop devices whose backing file lies under dir.
func loopsUnder(dir string) ([]loop.Device, error) {
	all, err := loop.List()
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(all, func(d loop.Device) bool { return !under(d.BackingFile, dir) }), nil
}

// sweep is the safety net behind the CSI calls: it unmounts everything
// under dir and detaches every loop device backed by a file under dir, and
// reports what it had to clean. A pool filesystem cannot be unmounted while
// a loop device still uses an image on it, and its own loop device cannot be
// detached while it is mounted, so it goes round a few times; the last round
// unmounts lazily.
func sweep(dir string) (cleaned []string, err error) {
	const rounds = 3
	for round := range rounds {
		mounts, err := mountsUnder(dir)
		if err != nil {
			return cleaned, err
		}
		loops, err := loopsUnder(dir)
		if err != nil {
			return cleaned, err
		}
		if len(mounts) == 0 && len(loops) == 0 {
			return cleaned, nil
		}
		flags := 0
		if round == rounds-1 {
			flags = unix.MNT_DETACH
		}
		for _, m := range mounts {
			if unix.Unmount(m, flags) == nil {
				cleaned = append(cleaned, "unmounted "+m)
			}
		}
		for _, d := range loops {
			if loop.Detach(d.Path) == nil {
				cleaned = append(cleaned, "detached "+d.Path+" ("+d.BackingFile+")")
			}
		}
	}
	mounts, err1 := mountsUnder(dir)
	loops, err2 := loopsUnder(dir)
	if err := errors.Join(err1, err2); err != nil {
		return cleaned, err
	}
	if len(mounts) > 0 || len(loops) > 0 {
		var devs []string
		for _, d := range loops {
			devs = append(devs, d.Path+" ("+d.BackingFile+")")
		}
		return cleaned, fmt.Errorf("could not clean up: mounts %v, loop devices %v", mounts, devs)
	}
	return cleaned, nil
}
