package loop

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// setup skips unless the test can manage loop devices, and returns a temp dir
// whose files must all be detached when the test ends.
func setup(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat(controlPath); err != nil {
		t.Skipf("needs %s: %v", controlPath, err)
	}
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// Registered after TempDir, so it runs before the directory is removed
	// and after every detach cleanup registered later.
	t.Cleanup(func() {
		devs, err := List()
		if err != nil {
			t.Errorf("List: %v", err)
			return
		}
		for _, d := range devs {
			if strings.HasPrefix(d.BackingFile, dir+"/") {
				t.Errorf("leaked %s backed by %s", d.Path, d.BackingFile)
				_ = Detach(d.Path)
			}
		}
	})
	return dir
}

func sparseFile(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

// attach attaches path and registers its detach. The cleanup detaches the
// device that path backs at the end, not d.Path: a test that detached d
// itself leaves d.Path free for any other process to take (a cluster
// beside the tests, another test binary), and that device is not ours.
func attach(t *testing.T, path string, opts Options) *Device {
	t.Helper()
	d, err := Attach(path, opts)
	if err != nil {
		t.Fatalf("Attach(%s): %v", path, err)
	}
	t.Cleanup(func() {
		devs, err := List()
		if err != nil {
			t.Errorf("cleanup: list loop devices: %v", err)
			return
		}
		for _, cur := range devs {
			// A backing file deleted since counts too (List strips the
			// kernel's " (deleted)"; Find skips such devices).
			if cur.Path == d.Path && cur.BackingFile == path {
				if err := Detach(cur.Path); err != nil {
					t.Errorf("cleanup Detach(%s): %v", cur.Path, err)
				}
			}
		}
	})
	return d
}

func statFile(t *testing.T, path string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// canODirect reports whether path's filesystem accepts O_DIRECT opens.
func canODirect(path string) bool {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

func TestLifecycle(t *testing.T) {
	dir := setup(t)
	img := filepath.Join(dir, "a.img")
	sparseFile(t, img, 64*mib)

	d := attach(t, img, Options{DirectIO: true})
	t.Logf("attached %+v", *d)

	if d.Path != fmt.Sprintf("/dev/loop%d", d.Number) || !devPathRE.MatchString(d.Path) {
		t.Errorf("Path %q, Number %d", d.Path, d.Number)
	}
	if d.BackingFile != img || d.Deleted || d.ReadOnly {
		t.Errorf("BackingFile %q Deleted %v ReadOnly %v", d.BackingFile, d.Deleted, d.ReadOnly)
	}
	fst := statFile(t, img)
	if d.Inode != fst.Ino || d.BackingDev != uint64(fst.Dev) {
		t.Errorf("Inode/BackingDev %d/%d, file has %d/%d", d.Inode, d.BackingDev, fst.Ino, fst.Dev)
	}
	dst := statFile(t, d.Path)
	if dst.Mode&unix.S_IFMT != unix.S_IFBLK || uint64(dst.Rdev) != d.Rdev {
		t.Errorf("device node %s: mode %o rdev %d, want block rdev %d", d.Path, dst.Mode, dst.Rdev, d.Rdev)
	}
	if canODirect(img) && !d.DirectIO {
		t.Errorf("DirectIO false although %s supports O_DIRECT", dir)
	}
	sysDIO, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/dio", d.Number))
	if err != nil {
		t.Fatal(err)
	}
	if want := map[bool]string{true: "1", false: "0"}[d.DirectIO]; strings.TrimSpace(string(sysDIO)) != want {
		t.Errorf("sysfs dio %q, DirectIO %v", sysDIO, d.DirectIO)
	}

	got, err := Find(img)
	if err != nil || got.Path != d.Path {
		t.Fatalf("Find: %+v, %v", got, err)
	}

	// Matching is by inode, so a rename does not lose the device.
	renamed := filepath.Join(dir, "renamed.img")
	if err := os.Rename(img, renamed); err != nil {
		t.Fatal(err)
	}
	got, err = Find(renamed)
	if err != nil || got.Path != d.Path || got.BackingFile != renamed {
		t.Fatalf("Find after rename: %+v, %v", got, err)
	}
	if _, err := Find(img); !errors.Is(err, ErrNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Find(old name): %v, want ErrNotFound and ErrNotExist", err)
	}

	if size, err := Size(d.Path); err != nil || size != 64*mib {
		t.Errorf("Size: %d, %v", size, err)
	}

	// Write through the device, read back from the file.
	pattern := bytes.Repeat([]byte("spool-loop-test!"), 4096/16*2)
	const off = 3 * mib
	devf, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := devf.WriteAt(pattern, off); err != nil {
		t.Fatal(err)
	}
	if err := devf.Sync(); err != nil {
		t.Fatal(err)
	}
	devf.Close()
	back := make([]byte, len(pattern))
	f, err := os.Open(renamed)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(back, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !bytes.Equal(back, pattern) {
		t.Errorf("backing file does not hold the bytes written through %s", d.Path)
	}

	again, err := Attach(renamed, Options{})
	if !errors.Is(err, ErrAlreadyAttached) || again == nil || again.Path != d.Path {
		t.Errorf("second Attach: %+v, %v; want existing %s and ErrAlreadyAttached", again, err, d.Path)
	}
	if again != nil && again.Path != d.Path {
		_ = Detach(again.Path)
	}

	if err := os.Truncate(renamed, 128*mib); err != nil {
		t.Fatal(err)
	}
	if size, err := SetCapacity(d.Path); err != nil || size != 128*mib {
		t.Errorf("SetCapacity: %d, %v", size, err)
	}
	if size, err := Size(d.Path); err != nil || size != 128*mib {
		t.Errorf("Size after grow: %d, %v", size, err)
	}

	if err := Detach(d.Path); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if got, err := Find(renamed); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find after Detach: %+v, %v", got, err)
	}
	if err := Detach(d.Path); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	if _, err := Size(d.Path); !errors.Is(err, ErrNotFound) {
		t.Errorf("Size after Detach: %v, want ErrNotFound", err)
	}
	if _, err := SetCapacity(d.Path); !errors.Is(err, ErrNotFound) {
		t.Errorf("SetCapacity after Detach: %v, want ErrNotFound", err)
	}
}

func TestReadOnly(t *testing.T) {
	dir := setup(t)
	img := filepath.Join(dir, "ro.img")
	sparseFile(t, img, 8*mib)

	d := attach(t, img, Options{ReadOnly: true})
	if !d.ReadOnly {
		t.Errorf("ReadOnly false: %+v", d)
	}
	devf, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
			t.Fatalf("open for write: %v", err)
		}
		return
	}
	defer devf.Close()
	_, err = devf.WriteAt(make([]byte, 4096), 0)
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EROFS) {
		t.Errorf("write to read-only device: %v, want EPERM or EROFS", err)
	}
}

func TestFindMissing(t *testing.T) {
	dir := setup(t)
	if _, err := Find(filepath.Join(dir, "nope")); !errors.Is(err, ErrNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Find(missing): %v", err)
	}
	img := filepath.Join(dir, "idle.img")
	sparseFile(t, img, mib)
	if _, err := Find(img); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find(unattached): %v", err)
	}
	if _, err := Attach(filepath.Join(dir, "nope"), Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Attach(missing): %v", err)
	}
	if _, err := Attach(dir, Options{ReadOnly: true}); err == nil {
		t.Errorf("Attach(directory) succeeded")
	}
}

func TestDeletedBackingFile(t *testing.T) {
	dir := setup(t)
	img := filepath.Join(dir, "gone.img")
	sparseFile(t, img, mib)
	d := attach(t, img, Options{})
	if err := os.Remove(img); err != nil {
		t.Fatal(err)
	}
	devs, err := List()
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, x := range devs {
		if x.Path == d.Path {
			found = true
			if !x.Deleted || x.BackingFile != img {
				t.Errorf("after unlink: BackingFile %q Deleted %v", x.BackingFile, x.Deleted)
			}
		}
	}
	if !found {
		t.Errorf("%s missing from List", d.Path)
	}
	if _, err := Find(img); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find(unlinked): %v", err)
	}
}

func TestInvalidPaths(t *testing.T) {
	for _, p := range []string{
		"/dev/sda", "/dev/loop../x", "/dev/loop", "/dev/loop-control", "/dev/loop1/../sda",
		"dev/loop0", "/dev/loop0 ", " /dev/loop0", "/dev/loop0\n", "/dev//loop0", "/dev/loop-1",
		"/dev/loop99999999999999999999", "",
	} {
		if err := Detach(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("Detach(%q): %v, want ErrInvalidPath", p, err)
		}
		if _, err := Size(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("Size(%q): %v, want ErrInvalidPath", p, err)
		}
		if _, err := SetCapacity(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("SetCapacity(%q): %v, want ErrInvalidPath", p, err)
		}
	}
}

func TestDetachNonexistentNode(t *testing.T) {
	setup(t)
	p := fmt.Sprintf("/dev/loop%d", maxMinor-1)
	if _, err := os.Stat(p); err == nil {
		t.Skipf("%s exists", p)
	}
	if err := Detach(p); err != nil {
		t.Errorf("Detach(%s): %v", p, err)
	}
	if _, err := Size(p); !errors.Is(err, ErrNotFound) {
		t.Errorf("Size(%s): %v, want ErrNotFound", p, err)
	}
}

func TestAttachConcurrent(t *testing.T) {
	dir := setup(t)
	const n = 8
	var (
		wg   sync.WaitGroup
		devs [n]*Device
		errs [n]error
	)
	for i := range n {
		img := filepath.Join(dir, fmt.Sprintf("c%d.img", i))
		sparseFile(t, img, 4*mib)
		wg.Go(func() { devs[i], errs[i] = Attach(img, Options{DirectIO: i%2 == 0}) })
	}
	wg.Wait()
	seen := map[string]int{}
	for i := range n {
		if errs[i] != nil {
			t.Errorf("Attach %d: %v", i, errs[i])
			continue
		}
		d := devs[i]
		t.Cleanup(func() {
			if err := Detach(d.Path); err != nil {
				t.Errorf("Detach(%s): %v", d.Path, err)
			}
		})
		if j, dup := seen[d.Path]; dup {
			t.Errorf("files %d and %d both got %s", i, j, d.Path)
		}
		seen[d.Path] = i
		if want := filepath.Join(dir, fmt.Sprintf("c%d.img", i)); d.BackingFile != want {
			t.Errorf("device %s backed by %q, want %q", d.Path, d.BackingFile, want)
		}
	}
}

// Concurrent Attach of one file must attach it once.
func TestAttachSameFileConcurrent(t *testing.T) {
	dir := setup(t)
	img := filepath.Join(dir, "same.img")
	sparseFile(t, img, mib)
	const n = 4
	var (
		wg   sync.WaitGroup
		devs [n]*Device
		errs [n]error
	)
	for i := range n {
		wg.Go(func() { devs[i], errs[i] = Attach(img, Options{}) })
	}
	wg.Wait()
	var ok int
	for i := range n {
		switch {
		case errs[i] == nil:
			ok++
			d := devs[i]
			t.Cleanup(func() { _ = Detach(d.Path) })
		case !errors.Is(errs[i], ErrAlreadyAttached):
			t.Errorf("Attach %d: %v", i, errs[i])
		}
	}
	if ok != 1 {
		t.Errorf("%d attaches succeeded, want 1", ok)
	}
}

func TestList(t *testing.T) {
	dir := setup(t)
	for i := range 3 {
		img := filepath.Join(dir, fmt.Sprintf("l%d.img", i))
		sparseFile(t, img, mib)
		attach(t, img, Options{ReadOnly: i == 1})
	}
	devs, err := List()
	if err != nil {
		t.Fatal(err)
	}
	var mine int
	for i, d := range devs {
		if i > 0 && devs[i-1].Number >= d.Number {
			t.Errorf("List not sorted: %d before %d", devs[i-1].Number, d.Number)
		}
		if strings.HasPrefix(d.BackingFile, dir+"/") {
			mine++
			if want := strings.HasSuffix(d.BackingFile, "l1.img"); d.ReadOnly != want {
				t.Errorf("%s ReadOnly %v", d.BackingFile, d.ReadOnly)
			}
		}
	}
	if mine != 3 {
		t.Errorf("List shows %d of 3 devices: %+v", mine, devs)
	}
}

// A device claimed exclusively (as by mkfs or a mount) is not detached, and
// Detach retries while the claim is short-lived.
func TestDetachExclusiveHolder(t *testing.T) {
	dir := setup(t)
	img := filepath.Join(dir, "excl.img")
	sparseFile(t, img, mib)
	d := attach(t, img, Options{})

	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := Detach(d.Path); !errors.Is(err, ErrBusy) {
		t.Errorf("Detach while claimed: %v, want ErrBusy", err)
	}
	if _, err := Find(img); err != nil {
		t.Errorf("device gone after refused Detach: %v", err)
	}

	// Released during Detach's retries: succeeds.
	go func() {
		time.Sleep(120 * time.Millisecond)
		unix.Close(fd)
	}()
	if err := Detach(d.Path); err != nil {
		t.Errorf("Detach after claim released: %v", err)
	}
	if _, err := Find(img); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find after Detach: %v", err)
	}
}

// LOOP_CLR_FD on a device someone holds open only arms autoclear; Detach
// waits for the last close, or reports ErrBusy if it does not come.
func TestDetachOpenHolder(t *testing.T) {
	defer func(d time.Duration) { teardownTimeout = d }(teardownTimeout)
	teardownTimeout = 500 * time.Millisecond
	dir := setup(t)
	img := filepath.Join(dir, "open.img")
	sparseFile(t, img, mib)
	d := attach(t, img, Options{})

	f, err := os.Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := Detach(d.Path); !errors.Is(err, ErrBusy) {
		t.Errorf("Detach while held open: %v, want ErrBusy", err)
	}
	f.Close() // last close: the kernel detaches now
	if _, err := Find(img); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find after last close: %v", err)
	}

	d = attach(t, img, Options{})
	f, err = os.Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(200 * time.Millisecond)
		f.Close()
	}()
	if err := Detach(d.Path); err != nil {
		t.Errorf("Detach with short-lived opener: %v", err)
	}
	if _, err := Find(img); !errors.Is(err, ErrNotFound) {
		t.Errorf("Find after Detach: %v", err)
	}
}

func TestDetachMounted(t *testing.T) {
	dir := setup(t)
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	img := filepath.Join(dir, "fs.img")
	sparseFile(t, img, 16*mib)
	d := attach(t, img, Options{})
	if out, err := exec.Command(mkfs, "-q", "-F", d.Path).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(d.Path, mnt, "ext4", 0, ""); err != nil {
		t.Skipf("mount: %v", err)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			_ = unix.Unmount(mnt, 0)
		}
	})

	if mp, err := mountedAt(d.Rdev, d.Path); err != nil || mp != mnt {
		t.Errorf("mountedAt: %q, %v; want %q", mp, err, mnt)
	}
	if err := Detach(d.Path); !errors.Is(err, ErrBusy) {
		t.Errorf("Detach while mounted: %v, want ErrBusy", err)
	}
	// Untouched: still attached and not armed for autoclear.
	auto, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/autoclear", d.Number))
	if err != nil || strings.TrimSpace(string(auto)) != "0" {
		t.Errorf("autoclear %q, %v", auto, err)
	}

	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if err := Detach(d.Path); err != nil {
		t.Errorf("Detach after unmount: %v", err)
	}
}

func TestSetFileName(t *testing.T) {
	var info unix.LoopInfo64
	long := "/" + strings.Repeat("é", 40) // 81 bytes
	setFileName(&info, long)
	got := unix.ByteSliceToString(info.File_name[:])
	if len(got) > 63 || !strings.HasPrefix(long, got) || !strings.HasSuffix(got, "é") {
		t.Errorf("setFileName: %q (%d bytes)", got, len(got))
	}
}
