package fs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// The node's hot path (stage, publish, unpublish, unstage) talks to the
// kernel directly: mount(2) and umount(2) instead of mount(8) and
// umount(8), superblock magic instead of blkid. Starting a program costs
// more than the kernel work itself (make bench, "spawn and wait for
// true(1)": 0.9-1.1 ms on the 2-CPU machine of docs/performance.md, 2.5 ms
// on an earlier one); only mkfs, fsck and the growth tools are still
// programs.

// flagOptions are the mount options that are VFS mount flags (mount(2)'s
// flags argument) rather than filesystem options (its data argument): set
// adds flags, and an option whose set is 0 (rw, exec, atime, ...) only
// asks for the default.
var flagOptions = map[string]uintptr{
	"ro": unix.MS_RDONLY, "rw": 0,
	"nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC, "exec": 0,
	"sync": unix.MS_SYNCHRONOUS, "async": 0, "dirsync": unix.MS_DIRSYNC,
	"noatime": unix.MS_NOATIME, "atime": 0,
	"nodiratime": unix.MS_NODIRATIME, "diratime": 0,
	"relatime": unix.MS_RELATIME, "norelatime": 0,
	"strictatime": unix.MS_STRICTATIME, "nostrictatime": 0,
	"lazytime": unix.MS_LAZYTIME, "nolazytime": 0,
	"iversion": unix.MS_I_VERSION, "noiversion": 0,
	"nosymfollow": unix.MS_NOSYMFOLLOW,
	"defaults":    0,
}

// splitOptions turns mount options (already allowlisted) into mount(2)'s
// flags and data.
func splitOptions(opts []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range opts {
		if f, ok := flagOptions[o]; ok {
			flags |= f
			continue
		}
		data = append(data, o)
	}
	return flags, strings.Join(data, ",")
}

// sysMount mounts the filesystem of type fsType on device at target.
func sysMount(device, target, fsType string, opts []string) error {
	flags, data := splitOptions(opts)
	if err := unix.Mount(device, target, fsType, flags, data); err != nil {
		return fmt.Errorf("mount -t %s -o %s %s %s: %w", fsType, strings.Join(opts, ","), device, target, err)
	}
	return nil
}

// statfsMountFlags are the per-mount flags statfs reports, as mount flags:
// a read-only remount of a bind keeps them (mount(2) replaces all of them).
var statfsMountFlags = []struct{ st, ms uintptr }{
	{unix.ST_NOSUID, unix.MS_NOSUID},
	{unix.ST_NODEV, unix.MS_NODEV},
	{unix.ST_NOEXEC, unix.MS_NOEXEC},
	{unix.ST_NOATIME, unix.MS_NOATIME},
	{unix.ST_NODIRATIME, unix.MS_NODIRATIME},
	{unix.ST_RELATIME, unix.MS_RELATIME},
	{unix.ST_SYNCHRONOUS, unix.MS_SYNCHRONOUS},
	{0x2000, unix.MS_NOSYMFOLLOW}, // ST_NOSYMFOLLOW (linux/statfs.h), not in x/sys
}

// sysBind bind-mounts source on target, read-only when ro. A bind mount
// takes the per-mount flags of the source's mount (nosuid, nodev of a
// staging mount); the read-only remount keeps them.
func sysBind(source, target string, ro bool) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	if !ro {
		return nil
	}
	var st unix.Statfs_t
	err := unix.Statfs(target, &st)
	if err == nil {
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY)
		for _, f := range statfsMountFlags {
			if uintptr(st.Flags)&f.st != 0 {
				flags |= f.ms
			}
		}
		err = unix.Mount("", target, "", flags, "")
	}
	if err != nil {
		if uerr := unix.Unmount(target, 0); uerr != nil {
			klog.ErrorS(uerr, "Could not undo a bind mount whose read-only remount failed", "target", target)
		}
		return fmt.Errorf("remounting the bind of %s on %s read-only: %w", source, target, err)
	}
	return nil
}

// sysUnmount unmounts target. EINVAL (not a mount point) is an error: the
// callers unmount only what they found mounted.
func sysUnmount(target string) error {
	if err := unix.Unmount(target, 0); err != nil {
		return fmt.Errorf("umount %s: %w", target, err)
	}
	return nil
}

// Superblock magics of the filesystems Spool makes (offsets from the start
// of the device).
const (
	xfsMagicOffset   = 0
	btrfsMagicOffset = 64<<10 + 64
	ext4IncompatOff  = ext4SuperOffset + 0x60
	ext4Extents      = 0x40 // EXT4_FEATURE_INCOMPAT_EXTENTS
	probeBytes       = btrfsMagicOffset + 8
)

// probeMagic reads the superblock magics of ext4, xfs and btrfs on device
// and returns the one filesystem it finds. With none, blank reports a
// device whose first and last 64 KiB are zeros, where every signature
// blkid looks for (filesystems, LVM, MD RAID at either end, LUKS, GPT and
// its backup, swap) would be: a new image, never formatted. Anything else
// (no magic on a device that is not blank, or several magics) is left to
// blkid.
func probeMagic(device string) (fsType string, blank bool, err error) {
	f, err := os.Open(device)
	if err != nil {
		return "", false, fmt.Errorf("opening %s: %w", device, err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, probeBytes)
	if n, err := f.ReadAt(b, 0); err != nil && n < ext4IncompatOff+4 {
		return "", false, fmt.Errorf("reading the superblocks of %s: %w", device, err)
	} else {
		b = b[:n]
	}
	var found []string
	if bytes.HasPrefix(b[xfsMagicOffset:], []byte("XFSB")) {
		found = append(found, "xfs")
	}
	le := binary.LittleEndian
	if le.Uint16(b[ext4SuperOffset+0x38:]) == ext4Magic && le.Uint32(b[ext4IncompatOff:])&ext4Extents != 0 {
		found = append(found, "ext4")
	}
	if len(b) >= probeBytes && bytes.Equal(b[btrfsMagicOffset:probeBytes], []byte("_BHRfS_M")) {
		found = append(found, "btrfs")
	}
	switch len(found) {
	case 1:
		return found[0], false, nil
	case 0:
		blank, err := zeroEnds(f, b)
		return "", blank, err
	}
	return "", false, nil
}

// tailBytes is how much of the end of a device must be zeros for it to be
// blank (MD RAID 1.0 and 0.90 superblocks, the GPT backup live there).
const tailBytes = 64 << 10

// zeroEnds reports whether head (the start of the device, read already)
// and the last tailBytes of f are all zeros.
func zeroEnds(f *os.File, head []byte) (bool, error) {
	if !allZero(head) || len(head) < probeBytes {
		return false, nil
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return false, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	tail := make([]byte, min(size, tailBytes))
	if _, err := f.ReadAt(tail, size-int64(len(tail))); err != nil {
		return false, fmt.Errorf("reading the end of %s: %w", f.Name(), err)
	}
	return allZero(tail), nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// mkfsArgs are the arguments of mkfs.<fsType> for a blank device, as
// k8s.io/mount-utils gives them (ext4: no blocks reserved for root), and
// without discarding the device first. A blank image reads as zeros
// already (a sparse file's holes, a thick one's preallocated extents), so
// the discard gains nothing, and on a loop device it punches holes in the
// image: a thick volume lost its whole preallocation to mkfs (1 GiB image:
// 33 MiB allocated after mkfs.ext4, 65 MiB after mkfs.xfs, 4.6 MiB after
// mkfs.btrfs).
func mkfsArgs(fsType, device string, formatOptions []string) []string {
	args := []string{device}
	switch fsType {
	case "ext4", "ext3":
		args = []string{"-F", "-m0", "-E", "nodiscard", device}
	case "xfs":
		args = []string{"-f", "-K", device}
	case "btrfs":
		args = []string{"-K", device}
	}
	return append(append([]string(nil), formatOptions...), args...)
}

// format makes a filesystem on a blank device.
func format(device, fsType string, formatOptions []string) error {
	start := time.Now()
	out, err := exec.Command("mkfs."+fsType, mkfsArgs(fsType, device, formatOptions)...).CombinedOutput()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("mkfs.%s %s: %w: %s", fsType, device, err, strings.TrimSpace(string(out)))
		}
		return fmt.Errorf("mkfs.%s %s: %w", fsType, device, err)
	}
	klog.V(2).InfoS("Formatted device", "device", device, "fsType", fsType, "duration", time.Since(start))
	return nil
}
