package extents

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The FIEMAP ioctl (linux/fiemap.h, Documentation/filesystems/fiemap.rst).
// golang.org/x/sys/unix has neither the request number nor the structures,
// so they are spelled out here; the call itself goes through unix.Syscall.
const (
	fsIocFiemap = 0xC020660B // _IOWR('f', 11, struct fiemap)

	fiemapFlagSync = 0x1 // write dirty pages back before mapping

	extentLast        = 0x1
	extentUnknown     = 0x2
	extentDelalloc    = 0x4
	extentEncoded     = 0x8
	extentNotAligned  = 0x100
	extentDataInline  = 0x200
	extentDataTail    = 0x400
	extentUnwritten   = 0x800
	extentWithoutAddr = extentUnknown | extentDelalloc | extentEncoded | extentNotAligned | extentDataInline | extentDataTail

	// fiemapBatch is how many extents one call maps.
	fiemapBatch = 256
)

// fiemapHeader is struct fiemap without its flexible array of extents.
type fiemapHeader struct {
	Start         uint64
	Length        uint64
	Flags         uint32
	MappedExtents uint32
	ExtentCount   uint32
	Reserved      uint32
}

// fiemapExtent is struct fiemap_extent.
type fiemapExtent struct {
	Logical    uint64
	Physical   uint64
	Length     uint64
	Reserved64 [2]uint64
	Flags      uint32
	Reserved   [3]uint32
}

// fiemapRequest is a struct fiemap with room for fiemapBatch extents, laid
// out as the kernel expects.
type fiemapRequest struct {
	fiemapHeader
	Extents [fiemapBatch]fiemapExtent
}

// errNoFiemap means the file's filesystem does not map extents (FUSE, NFS,
// tmpfs): the caller falls back to SEEK_DATA/SEEK_HOLE.
var errNoFiemap = errors.New("FIEMAP is not supported")

// fiemap maps the extents of f that overlap [start, EOF), at most
// fiemapBatch of them, written back first. last is set when the kernel
// marked the last extent of the file.
func fiemap(f *os.File, start int64, req *fiemapRequest) (ext []extent, last bool, err error) {
	*req = fiemapRequest{}
	req.Start = uint64(start)
	req.Length = ^uint64(0) - uint64(start)
	req.Flags = fiemapFlagSync
	req.ExtentCount = fiemapBatch
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(req)))
		if errno == unix.EINTR {
			continue
		}
		if errno == unix.EOPNOTSUPP || errno == unix.ENOTTY {
			return nil, false, fmt.Errorf("%s: %w (%v)", f.Name(), errNoFiemap, errno)
		}
		if errno != 0 {
			return nil, false, fmt.Errorf("FIEMAP of %s from %d: %w", f.Name(), start, errno)
		}
		break
	}
	n := min(int(req.MappedExtents), fiemapBatch)
	ext = make([]extent, 0, n)
	for _, e := range req.Extents[:n] {
		if e.Flags&extentLast != 0 {
			last = true
		}
		if e.Length == 0 {
			continue
		}
		x := extent{off: int64(e.Logical), end: int64(e.Logical + e.Length), unwritten: e.Flags&extentUnwritten != 0}
		if e.Flags&extentWithoutAddr == 0 && e.Physical != 0 {
			x.phys = int64(e.Physical)
		}
		ext = append(ext, x)
	}
	return ext, last || n == 0, nil
}
