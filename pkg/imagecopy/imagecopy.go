// Package imagecopy copies volume image files for snapshots and clones.
//
// A copy is a reflink (FICLONE) when the filesystem supports it: instant, and
// the two files share extents until either is written. Otherwise only the data
// extents of the source are copied (found with lseek SEEK_DATA/SEEK_HOLE), so
// the holes of a sparse image stay holes in the copy and are never read.
//
// The source must not be written while it is being copied; callers freeze or
// unmount the volume first.
package imagecopy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Method says how a copy was made.
type Method string

const (
	Reflink    Method = "reflink"     // FICLONE: instant, shares extents until written
	SparseCopy Method = "sparse-copy" // only the data extents were copied; holes stay holes
)

const (
	// chunkSize bounds how much is copied between two checks of ctx.
	chunkSize = 64 << 20
	// bufSize is the buffer of the read/write fallback.
	bufSize = 1 << 20
)

// result describes a finished copy; tests use it to see which path was taken.
type result struct {
	method      Method
	size        int64 // logical size of src and dst
	bytesCopied int64 // data bytes moved; 0 for a reflink
	readWrite   bool  // copy_file_range was unusable and read/write was used
}

// Copy makes dst a copy of src: same content, same size. dst must not exist: it is created
// with O_CREAT|O_EXCL|O_WRONLY (mode 0600) and removed again if Copy fails or ctx is cancelled.
// Copy first tries the FICLONE ioctl (unix.IoctlFileClone); when the filesystem cannot reflink
// (EOPNOTSUPP, ENOTTY, EXDEV, EINVAL, EBADF from the ioctl) it walks src's data extents with
// lseek SEEK_DATA / SEEK_HOLE and copies only those ranges, with copy_file_range (unix.CopyFileRange,
// loop until each range is done; fall back to a read/write loop with a 1 MiB buffer if
// copy_file_range fails with EXDEV/EINVAL/ENOSYS/EOPNOTSUPP), never reading holes; then it
// truncates dst to src's size so trailing holes are kept. ctx is checked between chunks
// (at most every 64 MiB). dst is fsynced before Copy returns. Returns which Method was used.
//
// src must be a regular file. After dst has been fsynced its parent directory
// is fsynced too, so that the new directory entry is durable.
func Copy(ctx context.Context, src, dst string) (Method, error) {
	srcFd, err := openAt(unix.AT_FDCWD, src, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("copy %s to %s: open source: %w", src, dst, err)
	}
	f := os.NewFile(uintptr(srcFd), src)
	defer f.Close()
	return CopyFrom(ctx, f, dst)
}

// CopyFrom is Copy from a source file the caller opened (and checked) for
// reading: what was checked is what gets copied.
func CopyFrom(ctx context.Context, srcFile *os.File, dst string) (Method, error) {
	dir, err := os.Open(filepath.Dir(dst))
	if err != nil {
		return "", fmt.Errorf("copy %s to %s: open destination directory: %w", srcFile.Name(), dst, err)
	}
	defer dir.Close()
	return CopyInto(ctx, srcFile, dir, filepath.Base(dst))
}

// CopyInto is CopyFrom into the file name of the open directory dir: the
// destination is created, and on failure removed, relative to dir and never
// through a link, so no path outside dir is ever resolved.
func CopyInto(ctx context.Context, srcFile *os.File, dir *os.File, name string) (Method, error) {
	start := time.Now()
	src := srcFile.Name()
	dst := target{dir: int(dir.Fd()), name: name, path: filepath.Join(dir.Name(), name)}
	res, err := copyFile(ctx, int(srcFile.Fd()), src, dst)
	if err != nil {
		return "", err
	}
	klog.V(4).InfoS("Copied image", "src", src, "dst", dst, "method", res.method,
		"size", res.size, "bytesCopied", res.bytesCopied, "readWriteFallback", res.readWrite,
		"duration", time.Since(start))
	return res.method, nil
}

// target is the destination of a copy: name in the open directory dir
// (path is for messages).
type target struct {
	dir  int
	name string
	path string
}

func (t target) String() string { return t.path }

func copyFile(ctx context.Context, srcFd int, src string, dst target) (res result, err error) {
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}

	var srcSt unix.Stat_t
	if err := unix.Fstat(srcFd, &srcSt); err != nil {
		return res, fmt.Errorf("copy %s to %s: stat source: %w", src, dst, err)
	}
	if srcSt.Mode&unix.S_IFMT != unix.S_IFREG {
		return res, fmt.Errorf("copy %s to %s: source is not a regular file", src, dst)
	}
	size := srcSt.Size
	res.size = size

	dstFd, err := openAt(dst.dir, dst.name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return res, fmt.Errorf("copy %s to %s: create destination: %w", src, dst, err)
	}
	var dstSt unix.Stat_t
	if err := unix.Fstat(dstFd, &dstSt); err != nil {
		_ = unix.Close(dstFd)
		// Without its identity we cannot be sure what we would remove;
		// O_EXCL just created it, so the path is ours.
		return res, errors.Join(fmt.Errorf("copy %s to %s: stat destination: %w", src, dst, err),
			removeCreated(dst, nil))
	}
	dstOpen := true
	defer func() {
		if dstOpen {
			_ = unix.Close(dstFd)
		}
		if err != nil {
			err = errors.Join(err, removeCreated(dst, &dstSt))
		}
	}()

	wrap := func(what string, err error) error {
		if what == "" {
			return fmt.Errorf("copy %s to %s: %w", src, dst, err)
		}
		return fmt.Errorf("copy %s to %s: %s: %w", src, dst, what, err)
	}

	matchNoCOW(srcFd, dstFd)
	cloneErr := ignoringEINTR(func() error { return unix.IoctlFileClone(dstFd, srcFd) })
	switch {
	case cloneErr == nil:
		res.method = Reflink
	case cannotReflink(cloneErr):
		klog.V(5).InfoS("Reflink not possible, copying data extents", "src", src, "dst", dst, "err", cloneErr)
		// A refused clone changes nothing, but make sure dst is empty
		// before writing into it.
		if err := unix.Ftruncate(dstFd, 0); err != nil {
			return res, wrap("truncate destination", err)
		}
		res.method = SparseCopy
		c := copier{ctx: ctx, src: srcFd, dst: dstFd}
		if err := c.copyData(size); err != nil {
			return res, wrap("", err)
		}
		res.bytesCopied = c.copied
		res.readWrite = c.readWrite
		if err := unix.Ftruncate(dstFd, size); err != nil {
			return res, wrap("truncate destination", err)
		}
	default:
		return res, wrap("FICLONE", cloneErr)
	}

	if err := ignoringEINTR(func() error { return unix.Fsync(dstFd) }); err != nil {
		return res, wrap("fsync destination", err)
	}
	dstOpen = false
	if err := unix.Close(dstFd); err != nil {
		return res, wrap("close destination", err)
	}
	if err := ignoringEINTR(func() error { return unix.Fsync(dst.dir) }); err != nil {
		return res, wrap("fsync destination directory", err)
	}
	return res, nil
}

// cannotReflink reports whether a FICLONE error means "this filesystem (or
// this pair of files) cannot be reflinked" rather than a real failure.
func cannotReflink(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) ||
		errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EBADF)
}

// copyFileRangeUnusable reports whether a copy_file_range error means the
// syscall cannot be used for this pair of files and read/write must be used.
func copyFileRangeUnusable(err error) bool {
	return errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP)
}

// copier copies the data extents of src into dst at the same offsets.
type copier struct {
	ctx       context.Context
	src, dst  int
	copied    int64
	readWrite bool // copy_file_range gave up; use pread/pwrite from now on
	buf       []byte
}

// copyData copies every data extent of src below size.
func (c *copier) copyData(size int64) error {
	off := int64(0)
	for off < size {
		data, err := unix.Seek(c.src, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
			return nil // no data at or after off: the rest is a hole
		case errors.Is(err, unix.EINVAL) && off == 0:
			// SEEK_DATA not supported here: treat the file as all data.
			return c.copyRange(0, size)
		case err != nil:
			return fmt.Errorf("lseek SEEK_DATA at %d: %w", off, err)
		}
		if data >= size {
			return nil
		}
		hole, err := unix.Seek(c.src, data, unix.SEEK_HOLE)
		switch {
		case errors.Is(err, unix.ENXIO):
			hole = size // the file shrank under us; copyRange will notice
		case err != nil:
			return fmt.Errorf("lseek SEEK_HOLE at %d: %w", data, err)
		}
		hole = min(hole, size)
		if hole <= data {
			return fmt.Errorf("lseek: hole at %d is not after data at %d", hole, data)
		}
		if err := c.copyRange(data, hole); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copyRange copies [start, end) in chunks of at most chunkSize, checking ctx
// before each chunk.
func (c *copier) copyRange(start, end int64) error {
	for off := start; off < end; {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		n := min(end-off, chunkSize)
		if err := c.copyChunk(off, n); err != nil {
			return err
		}
		off += n
		c.copied += n
	}
	return nil
}

// copyChunk copies n bytes at off, with copy_file_range unless it has been
// found unusable.
func (c *copier) copyChunk(off, n int64) error {
	done := int64(0)
	for !c.readWrite && done < n {
		roff, woff := off+done, off+done
		k, err := unix.CopyFileRange(c.src, &roff, c.dst, &woff, int(n-done), 0)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil && copyFileRangeUnusable(err):
			klog.V(5).InfoS("copy_file_range unusable, falling back to read/write", "err", err)
			c.readWrite = true
		case err != nil:
			return fmt.Errorf("copy_file_range at %d: %w", off+done, err)
		case k == 0:
			return fmt.Errorf("copy_file_range at %d: source ended early: %w", off+done, io.ErrUnexpectedEOF)
		default:
			done += int64(k)
		}
	}
	if done < n {
		return c.readWriteChunk(off+done, n-done)
	}
	return nil
}

// readWriteChunk copies n bytes at off with pread/pwrite.
func (c *copier) readWriteChunk(off, n int64) error {
	if c.buf == nil {
		c.buf = make([]byte, bufSize)
	}
	for n > 0 {
		r, err := unix.Pread(c.src, c.buf[:min(n, int64(len(c.buf)))], off)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("read at %d: %w", off, err)
		case r == 0:
			return fmt.Errorf("read at %d: source ended early: %w", off, io.ErrUnexpectedEOF)
		}
		for w := 0; w < r; {
			k, err := unix.Pwrite(c.dst, c.buf[w:r], off+int64(w))
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				return fmt.Errorf("write at %d: %w", off+int64(w), err)
			case k == 0:
				return fmt.Errorf("write at %d: %w", off+int64(w), io.ErrShortWrite)
			}
			w += k
		}
		off += int64(r)
		n -= int64(r)
	}
	return nil
}

func openAt(dir int, name string, flags int, mode uint32) (int, error) {
	var fd int
	err := ignoringEINTR(func() error {
		var err error
		fd, err = unix.Openat(dir, name, flags, mode)
		return err
	})
	return fd, err
}

func ignoringEINTR(fn func() error) error {
	for {
		err := fn()
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// removeCreated removes the destination Copy created. When want is set it
// only removes it if it is still that file, so a file someone else put
// there in the meantime is left alone.
func removeCreated(dst target, want *unix.Stat_t) error {
	if want != nil {
		var st unix.Stat_t
		if err := unix.Fstatat(dst.dir, dst.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return fmt.Errorf("removing partial copy %s: %w", dst, err)
		}
		if st.Dev != want.Dev || st.Ino != want.Ino {
			return fmt.Errorf("not removing %s: it was replaced during the copy", dst)
		}
	}
	if err := unix.Unlinkat(dst.dir, dst.name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing partial copy %s: %w", dst, err)
	}
	return nil
}
