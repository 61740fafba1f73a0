// Package leakcheck fails a test that leaves loop devices or mounts behind.
package leakcheck

import (
	"os"
	"strings"
	"testing"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/loop"
)

// Leaks returns the loop devices backed by files under dir and the mount
// points under dir.
func Leaks(dir string) (loops, mounts []string, err error) {
	devs, err := loop.List()
	if err != nil {
		return nil, nil, err
	}
	for _, d := range devs {
		if under(d.BackingFile, dir) {
			loops = append(loops, d.Path+" -> "+d.BackingFile)
		}
	}
	mi, err := fs.Mounts()
	if err != nil {
		return nil, nil, err
	}
	for _, m := range mi {
		if under(m.MountPoint, dir) {
			mounts = append(mounts, m.MountPoint)
		}
	}
	return loops, mounts, nil
}

func under(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// Check registers a cleanup (run after the test's own cleanups registered
// later) that fails the test if a loop device or mount under dir remains.
// Call it right after creating dir.
func Check(t testing.TB, dir string) {
	t.Helper()
	t.Cleanup(func() {
		loops, mounts, err := Leaks(dir)
		if err != nil {
			t.Errorf("leak check: %v", err)
			return
		}
		if len(loops) > 0 || len(mounts) > 0 {
			t.Errorf("test leaked loop devices %v and mounts %v under %s", loops, mounts, dir)
		}
	})
}

// RequireRoot skips tests that need loop devices and mounts when they cannot
// have them.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and mounts")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("needs /dev/loop-control")
	}
}
