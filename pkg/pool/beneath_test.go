package pool

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// openStepwise, the fallback where openat2 is missing, refuses what
// openat2 refuses: links at any element, "..", and files where a directory
// belongs.
func TestOpenStepwise(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "volumes", "tok"), 0o750))
	must(os.WriteFile(filepath.Join(root, "volumes", "tok", "disk.img"), []byte("x"), 0o600))
	must(os.WriteFile(filepath.Join(outside, "secret"), []byte("s"), 0o600))
	must(os.Symlink(outside, filepath.Join(root, "volumes", "linkdir")))
	must(os.Symlink(filepath.Join(outside, "secret"), filepath.Join(root, "volumes", "tok", "link.img")))
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY, 0)
	must(err)
	defer unix.Close(rfd)
	fd, err := openStepwise(rfd, "volumes/tok/disk.img", unix.O_RDONLY)
	if err != nil {
		t.Fatalf("a plain image: %v", err)
	}
	unix.Close(fd)
	for _, rel := range []string{"volumes/linkdir/secret", "volumes/tok/link.img", "../" + filepath.Base(outside) + "/secret", "volumes/tok/disk.img/x"} {
		fd, err := openStepwise(rfd, rel, unix.O_RDONLY)
		if err == nil {
			unix.Close(fd)
			t.Errorf("openStepwise(%s) succeeded", rel)
			continue
		}
		if !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.ENOTDIR) {
			t.Errorf("openStepwise(%s): %v, want ELOOP, EXDEV or ENOTDIR", rel, err)
		}
	}
}

// The lock files a pool creates are 0600: an unprivileged controller (the
// second replica of deploy/shared runs as a non-root user) must be able to
// open the lock file the first one created.
func TestCreatedFilesAreReadableByTheOwner(t *testing.T) {
	dir, _ := initShared(t)
	a := openShared(t, dir, false)
	v, _, err := a.CreateVolume(context.Background(), req("pvc-1", 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Update(v.Token(), func(v *Volume) error { return ErrUnchanged }); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{lockFile, createLockFile, filepath.Join(volumesDir, v.Token(), volumeLockFile)} {
		fi, err := os.Stat(filepath.Join(dir, rel))
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s has mode %o, want 600", rel, perm)
		}
	}
}
