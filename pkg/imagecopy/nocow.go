package imagecopy

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// fsNoCOWFlag is FS_NOCOW_FL of linux/fs.h (chattr +C), which x/sys does
// not define: btrfs then writes the file's blocks in place, without
// copy-on-write or data checksums.
const fsNoCOWFlag = 0x00800000

// attrFlags returns the file's inode flags (FS_IOC_GETFLAGS).
func attrFlags(fd int) (uint32, error) {
	return unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
}

// setNoCOW turns the flag on or off on fd, which must be an empty file
// (btrfs only changes it on a file without data); flags are its current
// inode flags.
func setNoCOW(fd int, flags uint32, on bool) error {
	want := flags &^ fsNoCOWFlag
	if on {
		want |= fsNoCOWFlag
	}
	if want == flags {
		return nil
	}
	if err := unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(want)); err != nil {
		return fmt.Errorf("FS_IOC_SETFLAGS: %w", err)
	}
	return nil
}

// MarkNoCOW makes the new, empty image f nodatacow when it lies on btrfs,
// and reports whether it did. A volume's image is a disk: btrfs's
// copy-on-write turns every write into it into an allocation, which cost
// random 4 KiB writes in a volume 7x (make bench figure 4: 6.5k against
// 48.5k a second, docs/volumes.md), and the filesystem inside the volume
// has its own checksums for its metadata. Snapshots and clones still share extents
// (FICLONE works between nodatacow files, and a write to a shared extent
// is copied once). Elsewhere it does nothing.
func MarkNoCOW(f *os.File) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", f.Name(), err)
	}
	if st.Type != unix.BTRFS_SUPER_MAGIC {
		return false, nil
	}
	flags, err := attrFlags(int(f.Fd()))
	if err != nil {
		return false, fmt.Errorf("nodatacow %s: FS_IOC_GETFLAGS: %w", f.Name(), err)
	}
	if err := setNoCOW(int(f.Fd()), flags, true); err != nil {
		return false, fmt.Errorf("nodatacow %s: %w", f.Name(), err)
	}
	return true, nil
}

// IsNoCOW reports whether the file is nodatacow; false where the
// filesystem has no such flag.
func IsNoCOW(f *os.File) bool {
	flags, err := attrFlags(int(f.Fd()))
	return err == nil && flags&fsNoCOWFlag != 0
}

// matchNoCOW gives the new, empty destination the source's nodatacow flag
// before the clone: btrfs refuses FICLONE between files that differ in it
// (EINVAL), which would turn a reflink into a full copy (an image made
// before Spool marked new images, cloned into a directory whose new files
// inherit the flag, or the other way round). Where the filesystem has no
// such flag both reads fail or agree, and nothing changes.
func matchNoCOW(src, dst int) {
	sf, err := attrFlags(src)
	if err != nil {
		return
	}
	df, err := attrFlags(dst)
	if err != nil || sf&fsNoCOWFlag == df&fsNoCOWFlag {
		return
	}
	if err := setNoCOW(dst, df, sf&fsNoCOWFlag != 0); err != nil && !errors.Is(err, unix.ENOTTY) {
		klog.V(4).InfoS("Could not match the source's nodatacow flag; the copy may not be a reflink", "err", err)
	}
}
