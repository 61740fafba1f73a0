package fs

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	mountutils "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// execer runs the filesystem tools used by NeedResize, Resize, NewUUID and
// UUID. It is a variable so that tests could substitute a fake.
var execer utilexec.Interface = utilexec.New()

// runTool executes a tool and returns its combined output; a failure carries the
// command line and the output.
func runTool(name string, args ...string) (string, error) {
	start := time.Now()
	out, err := execer.Command(name, args...).CombinedOutput()
	klog.V(4).InfoS("Ran filesystem tool", "command", name, "args", args, "duration", time.Since(start), "err", err)
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// NeedResize reports whether the filesystem on devicePath, mounted at
// mountPath, is smaller than the device.
//
// mount-utils answers for read-only and blank devices and for btrfs, but
// always says yes for ext3/ext4/xfs (it leaves the check to resize2fs and
// xfs_growfs); for those the filesystem size is compared here with the size
// the resize tool would grow it to.
//
// fsType is what the caller knows the device holds ("": probe it). ext4
// and xfs are answered from the superblock and the geometry ioctl, without
// starting a program.
func (m *Mounter) NeedResize(devicePath, mountPath, fsType string) (bool, error) {
	if ro, err := deviceReadOnly(devicePath); err != nil || ro {
		return false, err // a read-only device cannot be grown into
	}
	format := fsType
	if format == "" {
		var err error
		if format, err = m.Probe(devicePath); err != nil {
			return false, err
		}
	}
	var need bool
	var err error
	switch format {
	case "ext3", "ext4":
		need, err = extNeedResize(devicePath)
	case "xfs":
		need, err = xfsNeedResize(devicePath, mountPath)
	default:
		need, err = mountutils.NewResizeFs(execer).NeedResize(devicePath, mountPath)
	}
	if err != nil {
		return false, fmt.Errorf("checking whether %s needs a resize: %w", devicePath, err)
	}
	klog.V(4).InfoS("Checked filesystem size", "device", devicePath, "mountPath", mountPath, "fsType", format, "needResize", need)
	return need, nil
}

// BtrfsMinResizeBytes is the smallest size the kernel grows (or shrinks) a
// btrfs device to: BTRFS_IOC_RESIZE fails with EINVAL below 256 MiB, so a
// btrfs volume cannot be expanded to less than this.
const BtrfsMinResizeBytes = 256 << 20

// Resize grows the filesystem on devicePath, mounted at mountPath, online to
// fill the device.
//
// Online ext4 resizing (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, and
// btrfs cannot be resized to less than BtrfsMinResizeBytes.
func (m *Mounter) Resize(devicePath, mountPath string) error {
	start := time.Now()
	format, err := m.Probe(devicePath)
	if err != nil {
		return err
	}
	if format == "btrfs" {
		size, err := blockDeviceSize(devicePath)
		if err != nil {
			return fmt.Errorf("resizing filesystem on %s: %w", devicePath, err)
		}
		if size < BtrfsMinResizeBytes {
			return fmt.Errorf("resizing filesystem on %s mounted at %s: btrfs cannot be resized to %d bytes, the kernel's minimum is %d (256 MiB)",
				devicePath, mountPath, size, BtrfsMinResizeBytes)
		}
	}
	ok, err := mountutils.NewResizeFs(execer).Resize(devicePath, mountPath)
	if err != nil {
		hint := ""
		if strings.Contains(err.Error(), "Permission denied to resize filesystem") {
			hint = " (online ext4 resizing needs CAP_SYS_RESOURCE)"
		}
		return fmt.Errorf("resizing filesystem on %s mounted at %s%s: %w", devicePath, mountPath, hint, err)
	}
	if !ok {
		return fmt.Errorf("resizing filesystem on %s mounted at %s: the device holds no filesystem", devicePath, mountPath)
	}
	klog.V(4).InfoS("Resized filesystem", "device", devicePath, "mountPath", mountPath, "duration", time.Since(start))
	return nil
}

// GrowUnmounted grows an unmounted ext4 filesystem to fill its device, and
// reports whether it had to. ext4 is grown before it is mounted because
// online growth needs CAP_SYS_RESOURCE, which an unmounted filesystem does
// not; xfs and btrfs can only grow online, so for them this does nothing.
func (m *Mounter) GrowUnmounted(device, fsType string) (bool, error) {
	if fsType != "ext4" {
		return false, nil
	}
	need, err := extNeedResize(device)
	if err != nil || !need {
		return false, err
	}
	start := time.Now()
	if err := checkExt(device); err != nil {
		return false, fmt.Errorf("checking %s before growing it: %w", device, err)
	}
	if _, err := runTool("resize2fs", device); err != nil {
		return false, fmt.Errorf("growing the filesystem on %s: %w", device, err)
	}
	klog.V(4).InfoS("Grew unmounted filesystem", "device", device, "fsType", fsType, "duration", time.Since(start))
	return true, nil
}

// parseToolFields parses "key<sep>value" lines into a map of unsigned integers,
// skipping lines whose value is not a number.
func parseToolFields(out, sep string) map[string]uint64 {
	fields := map[string]uint64{}
	for line := range strings.SplitSeq(out, "\n") {
		k, v, ok := strings.Cut(line, sep)
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			continue
		}
		fields[strings.TrimSpace(k)] = n
	}
	return fields
}

// toolFields returns the named fields, or an error naming the first one missing.
func toolFields(fields map[string]uint64, tool string, names ...string) ([]uint64, error) {
	out := make([]uint64, len(names))
	for i, n := range names {
		v, ok := fields[n]
		if !ok {
			return nil, fmt.Errorf("%s output has no %q", tool, n)
		}
		out[i] = v
	}
	return out, nil
}

// extNeedResize compares the ext2/3/4 block count with what an online
// resize would grow it to: the device size in blocks, less a trailing partial
// block group too small for its bitmaps, inode table and a block (the kernel
// drops such a group; offline resize2fs also drops one with fewer than 50
// data blocks). Backup superblocks are left out of that overhead, so a
// borderline tail errs towards "needs resize", where resize2fs is a no-op.
func extNeedResize(devicePath string) (bool, error) {
	sb, err := readExt4Superblock(devicePath)
	if err != nil {
		return false, err
	}
	blocks, blockSize, firstBlock, perGroup, inodeBlocks := sb.blocks, sb.blockSize, sb.firstBlock, sb.blocksPerGroup, sb.inodeBlocksPerG
	size, err := blockDeviceSize(devicePath)
	if err != nil {
		return false, err
	}
	target := size / blockSize
	if target <= blocks {
		return false, nil
	}
	if target > firstBlock {
		data := target - firstBlock
		rem := data % perGroup
		groups := (data + perGroup - 1) / perGroup
		if groups > 1 && rem != 0 && rem <= inodeBlocks+3 {
			target -= rem
		}
	}
	return target > blocks, nil
}

// xfsMinAGBlocks is XFS_MIN_AG_BLOCKS: xfs_growfs leaves out a trailing
// allocation group smaller than this.
const xfsMinAGBlocks = 64

// deviceReadOnly reports whether a block device is read-only (BLKROGET).
func deviceReadOnly(device string) (bool, error) {
	fd, err := unix.Open(device, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", device, err)
	}
	defer func() { _ = unix.Close(fd) }()
	ro, err := unix.IoctlGetInt(fd, unix.BLKROGET)
	if err != nil {
		return false, fmt.Errorf("BLKROGET %s: %w", device, err)
	}
	return ro != 0, nil
}

// xfsGeometryV1 is struct xfs_fsop_geom_v1 (linux/fs/xfs/libxfs/xfs_fs.h),
// which XFS_IOC_FSGEOMETRY_V1 fills; only the leading fields are used.
type xfsGeometryV1 struct {
	BlockSize, RtExtSize, AgBlocks, AgCount, LogBlocks, SectSize, InodeSize, ImaxPct uint32
	DataBlocks, RtBlocks, RtExtents, LogStart                                        uint64
	UUID                                                                             [16]byte
	Sunit, Swidth                                                                    uint32
	Version                                                                          int32
	Flags, LogSectSize, RtSectSize, DirBlockSize                                     uint32
	_                                                                                uint32 // padding to 112 bytes
}

// xfsIocFSGeometryV1 is _IOR('X', 100, struct xfs_fsop_geom_v1).
const xfsIocFSGeometryV1 = 0x80705864

// xfsGeometry reads the block size, blocks per allocation group and data
// blocks of the xfs mounted at mountPath with the geometry ioctl, or, where
// that fails, from xfs_io.
func xfsGeometry(mountPath string) (bsize, agBlocks, dataBlocks uint64, err error) {
	if fd, oerr := unix.Open(mountPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); oerr == nil {
		var g xfsGeometryV1
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), xfsIocFSGeometryV1, uintptr(unsafe.Pointer(&g)))
		_ = unix.Close(fd)
		if errno == 0 && g.BlockSize != 0 && g.AgBlocks != 0 {
			return uint64(g.BlockSize), uint64(g.AgBlocks), g.DataBlocks, nil
		}
		klog.V(4).InfoS("XFS geometry ioctl failed, asking xfs_io", "mountPath", mountPath, "errno", errno)
	}
	out, err := runTool("xfs_io", "-r", "-c", "statfs", mountPath)
	if err != nil {
		return 0, 0, 0, err
	}
	v, err := toolFields(parseToolFields(out, "="), "xfs_io statfs", "geom.bsize", "geom.agblocks", "geom.datablocks")
	if err != nil {
		return 0, 0, 0, err
	}
	return v[0], v[1], v[2], nil
}

// xfsNeedResize compares the XFS data section (from the geometry ioctl, via
// xfs_io on the mount point) with what xfs_growfs would grow it to.
func xfsNeedResize(devicePath, mountPath string) (bool, error) {
	if mountPath == "" {
		return false, fmt.Errorf("xfs: the mount path of %s is needed", devicePath)
	}
	bsize, agBlocks, dataBlocks, err := xfsGeometry(mountPath)
	if err != nil {
		return false, err
	}
	if bsize == 0 || agBlocks == 0 {
		return false, fmt.Errorf("xfs_io reports block size %d and %d blocks per AG", bsize, agBlocks)
	}
	size, err := blockDeviceSize(devicePath)
	if err != nil {
		return false, err
	}
	target := size / bsize
	if rem := target % agBlocks; rem != 0 && rem < xfsMinAGBlocks {
		target -= rem
	}
	return target > dataBlocks, nil
}
