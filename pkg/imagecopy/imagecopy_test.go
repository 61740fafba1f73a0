package imagecopy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/loop"
)

const mib = 1 << 20

// randomBytes returns n bytes from a generator seeded with seed.
func randomBytes(seed uint64, n int) []byte {
	var s [32]byte
	s[0] = byte(seed)
	s[1] = byte(seed >> 8)
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(s).Read(b)
	return b
}

// extent is a range of a test file holding data.
type extent struct {
	off  int64
	data []byte
}

// makeSparse creates path with the given size and data extents.
func makeSparse(t *testing.T, path string, size int64, extents []extent) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, e := range extents {
		if _, err := f.WriteAt(e.data, e.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s at %d: %v", path, off, err)
	}
	return b
}

func stat(t *testing.T, path string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func fsName(t *testing.T, dir string) string {
	t.Helper()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}
	switch sfs.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext2/3/4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	}
	return "unknown"
}

// checkCopy checks that dst has src's size and mode 0600, the given data
// extents, and zeros at the given offsets.
func checkCopy(t *testing.T, dst string, size int64, extents []extent, zeroAt []int64) {
	t.Helper()
	st := stat(t, dst)
	if st.Size != size {
		t.Errorf("dst size %d, want %d", st.Size, size)
	}
	if perm := st.Mode & 0o777; perm != 0o600 {
		t.Errorf("dst mode %o, want 600", perm)
	}
	for _, e := range extents {
		if got := readAt(t, dst, e.off, len(e.data)); !bytes.Equal(got, e.data) {
			t.Errorf("dst differs from src in [%d, %d)", e.off, e.off+int64(len(e.data)))
		}
	}
	zero := make([]byte, 64<<10)
	for _, off := range zeroAt {
		n := int(min(int64(len(zero)), size-off))
		if got := readAt(t, dst, off, n); !bytes.Equal(got, zero[:n]) {
			t.Errorf("dst is not zero at %d", off)
		}
	}
}

func threeExtents() (int64, []extent) {
	return 256 * mib, []extent{
		{0, randomBytes(1, mib)},
		{100 * mib, randomBytes(2, mib)},
		{255 * mib, randomBytes(3, mib)},
	}
}

// Test 1: on the temp dir's filesystem (ext4 here, no reflink) only the data
// extents are copied.
func TestSparseCopy(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	size, extents := threeExtents()
	makeSparse(t, src, size, extents)

	start := time.Now()
	res, err := copyPath(t, src, dst)
	d := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if res.method != SparseCopy {
		t.Fatalf("method %q on %s, want %q", res.method, fsName(t, dir), SparseCopy)
	}
	if res.readWrite {
		t.Error("copy_file_range was not used on a single filesystem")
	}
	if res.bytesCopied != 3*mib {
		t.Errorf("copied %d bytes, want %d", res.bytesCopied, 3*mib)
	}
	checkCopy(t, dst, size, extents, []int64{mib, 50 * mib, 101 * mib, 200 * mib, 255*mib - 64<<10})
	alloc := stat(t, dst).Blocks * 512
	if alloc >= 8*mib {
		t.Errorf("dst allocates %d bytes; holes were copied", alloc)
	}
	t.Logf("fs %s: sparse copy of %d MiB file with 3 MiB data took %v, dst allocates %d KiB (src %d KiB)",
		fsName(t, dir), size/mib, d, alloc/1024, stat(t, src).Blocks*512/1024)

	// The exported entry point does the same.
	dst2 := filepath.Join(dir, "dst2.img")
	m, err := Copy(context.Background(), src, dst2)
	if err != nil || m != SparseCopy {
		t.Fatalf("Copy = %q, %v", m, err)
	}
	checkCopy(t, dst2, size, extents, nil)
}

// Test 5: a size that is not a multiple of the block size, data at the end.
func TestSparseCopyUnalignedSize(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	size := int64(10*mib + 123)
	tail := randomBytes(4, 5000)
	extents := []extent{{size - int64(len(tail)), tail}}
	makeSparse(t, src, size, extents)

	m, err := Copy(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if m != SparseCopy {
		t.Fatalf("method %q, want %q", m, SparseCopy)
	}
	checkCopy(t, dst, size, extents, []int64{0, 5 * mib})
	// Nothing follows the last byte.
	f, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if n, err := f.ReadAt(make([]byte, 1), size); n != 0 || err != io.EOF {
		t.Errorf("read past the end: %d, %v", n, err)
	}
}

// Files without data: empty, and all hole.
func TestSparseCopyNoData(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int64{0, 64 * mib} {
		src := filepath.Join(dir, "src")
		dst := filepath.Join(dir, "dst")
		makeSparse(t, src, size, nil)
		res, err := copyPath(t, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		if res.method != SparseCopy || res.bytesCopied != 0 {
			t.Errorf("size %d: %+v", size, res)
		}
		if st := stat(t, dst); st.Size != size || st.Blocks != 0 {
			t.Errorf("size %d: dst size %d, %d blocks", size, st.Size, st.Blocks)
		}
		_ = os.Remove(src)
		_ = os.Remove(dst)
	}
}

// A data extent larger than one chunk is copied in several chunks.
func TestSparseCopyLargeExtent(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	data := randomBytes(5, chunkSize+3*mib+17)
	extents := []extent{{7 * mib, data}}
	size := int64(100 * mib)
	makeSparse(t, src, size, extents)
	res, err := copyPath(t, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if res.method != SparseCopy {
		t.Fatalf("method %q", res.method)
	}
	checkCopy(t, dst, size, extents, []int64{0, 90 * mib})
}

// Across filesystems (tmpfs to the temp dir) copy_file_range returns EXDEV
// and the read/write loop is used.
func TestSparseCopyReadWriteFallback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	mnt := t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	src := filepath.Join(mnt, "src.img")
	dst := filepath.Join(t.TempDir(), "dst.img")
	size := int64(32*mib + 1)
	extents := []extent{{0, randomBytes(6, 3*mib+5)}, {20 * mib, randomBytes(7, mib)}, {size - 1, []byte{0x5a}}}
	makeSparse(t, src, size, extents)

	res, err := copyPath(t, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if res.method != SparseCopy {
		t.Fatalf("method %q", res.method)
	}
	if !res.readWrite {
		t.Errorf("read/write fallback not used from %s to %s", fsName(t, mnt), fsName(t, filepath.Dir(dst)))
	}
	checkCopy(t, dst, size, extents, []int64{4 * mib, 10 * mib, 30 * mib})
	if alloc := stat(t, dst).Blocks * 512; alloc >= 12*mib {
		t.Errorf("dst allocates %d bytes; holes were copied", alloc)
	}
}

// Test 4: error cases.
func TestCopyErrors(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	size, extents := threeExtents()
	makeSparse(t, src, size, extents)

	t.Run("dst exists", func(t *testing.T) {
		dst := filepath.Join(dir, "exists.img")
		if err := os.WriteFile(dst, []byte("keep me"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Copy(context.Background(), src, dst); err == nil || !errors.Is(err, os.ErrExist) {
			t.Fatalf("Copy onto an existing file: %v", err)
		}
		got, err := os.ReadFile(dst)
		if err != nil || string(got) != "keep me" {
			t.Fatalf("dst changed: %q, %v", got, err)
		}
		if perm := stat(t, dst).Mode & 0o777; perm != 0o644 {
			t.Errorf("dst mode changed to %o", perm)
		}
	})

	t.Run("src missing", func(t *testing.T) {
		dst := filepath.Join(dir, "from-missing.img")
		if _, err := Copy(context.Background(), filepath.Join(dir, "missing.img"), dst); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("Copy from a missing file: %v", err)
		}
		if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dst exists: %v", err)
		}
	})

	t.Run("src is a directory", func(t *testing.T) {
		dst := filepath.Join(dir, "from-dir.img")
		if _, err := Copy(context.Background(), dir, dst); err == nil {
			t.Fatal("Copy from a directory succeeded")
		}
		if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dst exists: %v", err)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		dst := filepath.Join(dir, "cancelled.img")
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := Copy(ctx, src, dst); !errors.Is(err, context.Canceled) {
			t.Fatalf("Copy with a cancelled context: %v", err)
		}
		if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dst exists: %v", err)
		}
	})

	t.Run("cancelled during copy", func(t *testing.T) {
		dst := filepath.Join(dir, "cancelled-late.img")
		// Let the first two checks pass: the start and the first extent.
		ctx := &countdownCtx{Context: context.Background(), left: 2}
		if m, err := Copy(ctx, src, dst); !errors.Is(err, context.Canceled) {
			t.Fatalf("Copy cancelled half way: %q, %v", m, err)
		}
		if ctx.left >= 0 {
			t.Fatalf("ctx checked only %d times", 2-ctx.left)
		}
		if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dst exists: %v", err)
		}
	})
}

// countdownCtx reports context.Canceled from Err once it has been asked
// more than left times.
type countdownCtx struct {
	context.Context
	left int
}

func (c *countdownCtx) Err() error {
	c.left--
	if c.left < 0 {
		return context.Canceled
	}
	return nil
}

// Tests 2 and 3: reflink on xfs and btrfs.
func TestReflinkXFS(t *testing.T) {
	testReflink(t, "xfs", "mkfs.xfs", "-q", "-m", "reflink=1")
}

func TestReflinkBtrfs(t *testing.T) {
	testReflink(t, "btrfs", "mkfs.btrfs", "-q")
}

func testReflink(t *testing.T, fsType, mkfs string, mkfsArgs ...string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and mount")
	}
	if _, err := exec.LookPath(mkfs); err != nil {
		t.Skipf("%s not installed", mkfs)
	}
	mnt := mountScratch(t, fsType, mkfs, mkfsArgs...)

	src, dst := filepath.Join(mnt, "src.img"), filepath.Join(mnt, "dst.img")
	writeHalfFull(t, src, 512*mib, 256*mib)
	before := usedBytes(t, mnt)

	start := time.Now()
	m, err := Copy(context.Background(), src, dst)
	d := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if m != Reflink {
		t.Fatalf("method %q on %s, want %q", m, fsType, Reflink)
	}
	after := usedBytes(t, mnt)
	if st := stat(t, dst); st.Size != 512*mib || st.Mode&0o777 != 0o600 {
		t.Errorf("dst size %d mode %o", st.Size, st.Mode&0o777)
	}
	if hs, hd := fileSHA256(t, src), fileSHA256(t, dst); hs != hd {
		t.Errorf("sha256 differs: src %x dst %x", hs, hd)
	}
	grew := after - before

	// The copy is independent: writing it leaves src alone.
	srcSum := fileSHA256(t, src)
	f, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(randomBytes(8, mib), 10*mib); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if fileSHA256(t, src) != srcSum {
		t.Error("writing dst changed src")
	}
	if grew >= 4*mib {
		t.Errorf("used space grew by %d bytes; extents were not shared", grew)
	}
	t.Logf("%s: reflink of 512 MiB file (256 MiB data) took %v; used space %d -> %d bytes (grew %d KiB)",
		fsType, d, before, after, grew/1024)
}

// mountScratch formats a 1 GiB sparse image with mkfs, attaches it to a loop
// device and mounts it; everything is undone in t.Cleanup.
func mountScratch(t *testing.T, fsType, mkfs string, mkfsArgs ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "scratch.img")
	makeSparse(t, img, 1<<30, nil)
	dev, err := loop.Attach(img, loop.Options{})
	if err != nil {
		t.Fatalf("attach %s: %v", img, err)
	}
	t.Cleanup(func() {
		if err := loop.Detach(dev.Path); err != nil {
			t.Errorf("detach %s: %v", dev.Path, err)
		}
	})
	if out, err := exec.Command(mkfs, append(mkfsArgs, dev.Path)...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", mkfs, dev.Path, err, out)
	}
	mnt := t.TempDir()
	if err := unix.Mount(dev.Path, mnt, fsType, 0, ""); err != nil {
		if errors.Is(err, unix.ENODEV) {
			t.Skipf("kernel does not support %s", fsType)
		}
		t.Fatalf("mount %s on %s: %v", dev.Path, mnt, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt
}

// writeHalfFull creates path with the given size and dataSize bytes of
// random data at the start, written in 4 MiB chunks, and fsyncs it.
func writeHalfFull(t *testing.T, path string, size, dataSize int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	rng := rand.NewChaCha8([32]byte{9})
	buf := make([]byte, 4*mib)
	for off := int64(0); off < dataSize; off += int64(len(buf)) {
		_, _ = rng.Read(buf)
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// usedBytes commits the filesystem (btrfs updates its counters at
// transaction commit) and returns its used bytes according to statfs.
func usedBytes(t *testing.T, mnt string) int64 {
	t.Helper()
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.Syncfs(fd); err != nil {
		t.Fatal(err)
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		t.Fatal(err)
	}
	return int64(sfs.Blocks-sfs.Bfree) * sfs.Bsize
}

func fileSHA256(t *testing.T, path string) [sha256.Size]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var sum [sha256.Size]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// copyPath opens src and copies it with copyFile, reporting what it did.
func copyPath(t *testing.T, src, dst string) (result, error) {
	t.Helper()
	f, err := os.Open(src)
	if err != nil {
		return result{}, err
	}
	defer f.Close()
	dir, err := os.Open(filepath.Dir(dst))
	if err != nil {
		return result{}, err
	}
	defer dir.Close()
	return copyFile(context.Background(), int(f.Fd()), src, target{dir: int(dir.Fd()), name: filepath.Base(dst), path: dst})
}
