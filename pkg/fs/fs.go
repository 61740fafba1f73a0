// Package fs is the only code that formats, mounts, unmounts and inspects
// filesystems. It wraps k8s.io/mount-utils for format-and-mount and reads the
// mount table from /proc/self/mountinfo.
package fs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	mountutils "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Supported filesystems, and their smallest volumes: what mkfs accepts
// (xfsprogs 6.1 refuses less than 300 MiB), and for btrfs what the kernel
// can still grow (BTRFS_IOC_RESIZE refuses sizes below 256 MiB, though
// mkfs.btrfs would take 109 MiB).
var minSize = map[string]int64{
	"ext4":  1 << 20,
	"xfs":   300 << 20,
	"btrfs": BtrfsMinResizeBytes,
}

// DefaultFSType is used when the CO names none.
const DefaultFSType = "ext4"

// Supported reports whether fsType can be formatted and mounted.
func Supported(fsType string) bool {
	_, ok := minSize[fsType]
	return ok
}

// SupportedTypes lists the supported filesystems.
func SupportedTypes() []string {
	out := make([]string, 0, len(minSize))
	for k := range minSize {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// NoReplayOptions are the mount options that keep a read-only mount of
// fsType from replaying its journal or log: the device under it is
// read-only too, and a log left dirty by a writer that died cannot be
// replayed without writing. The last writer's unreplayed changes are not
// visible through such a mount.
func NoReplayOptions(fsType string) []string {
	switch fsType {
	case "ext4":
		return []string{"noload"}
	case "xfs":
		return []string{"norecovery"}
	case "btrfs":
		return []string{"rescue=nologreplay"} // Linux 5.9+; plain nologreplay is gone
	}
	return nil
}

// MinSize is the smallest volume mkfs accepts for fsType (0 if unknown).
func MinSize(fsType string) int64 { return minSize[fsType] }

// MountInfo is one entry of the mount table, with the kernel's octal
// escapes (\040 for a space, ...) undone.
type MountInfo struct {
	Major, Minor int
	// Root is the path inside the mounted filesystem that the mount shows
	// ("/loop3" for a bind of the device node /dev/loop3 from devtmpfs).
	Root         string
	MountPoint   string
	FsType       string
	Source       string
	MountOptions []string
}

// Stats are a filesystem's usage.
type Stats struct {
	TotalBytes, AvailableBytes, UsedBytes int64
	TotalInodes, FreeInodes, UsedInodes   int64
	ReadOnly                              bool
}

// Mounter formats and mounts for real.
type Mounter struct {
	safe *mountutils.SafeFormatAndMount
}

// New returns a Mounter using the host's mount and mkfs binaries.
func New() *Mounter {
	return &Mounter{safe: mountutils.NewSafeFormatAndMount(mountutils.NewWithoutSystemd(""), utilexec.New())}
}

// Probe returns the filesystem found on device, "" when it is blank. The
// superblocks of the filesystems Spool makes, and the ends of a blank
// device, are read directly; a device that is neither is left to blkid,
// which tells what else it holds.
func (m *Mounter) Probe(device string) (string, error) {
	if f, blank, err := probeMagic(device); err != nil || f != "" || blank {
		return f, err
	}
	f, err := m.safe.GetDiskFormat(device)
	if err != nil {
		return "", fmt.Errorf("probing %s: %w", device, err)
	}
	return f, nil
}

// FormatAndMount formats device, which the caller found blank (Probe),
// with fsType and mounts it at target.
func (m *Mounter) FormatAndMount(device, target, fsType string, options, formatOptions []string) error {
	klog.V(4).InfoS("Format and mount", "device", device, "target", target, "fsType", fsType, "options", options)
	if slices.Contains(options, "ro") {
		return fmt.Errorf("format and mount %s on %s: a blank device is not formatted for a read-only mount", device, target)
	}
	if err := format(device, fsType, formatOptions); err != nil {
		return err
	}
	return sysMount(device, target, fsType, options)
}

// MountFormatted mounts device, which holds a filesystem of type fsType, at
// target. Unlike FormatAndMount it does not probe the device again or run
// fsck on every mount (starting those programs dominated a restage): the
// kernel replays journals at mount, and an ext4 filesystem that recorded
// errors is repaired with e2fsck -p first, as fsck -a would.
func (m *Mounter) MountFormatted(device, target, fsType string, options []string) error {
	if fsType == "ext4" && !slices.Contains(options, "ro") {
		sb, err := readExt4Superblock(device)
		if err != nil {
			return err
		}
		if sb.hasErrors {
			klog.InfoS("Filesystem recorded errors: checking it before mounting", "device", device)
			if err := checkExt(device); err != nil {
				return fmt.Errorf("repairing %s: %w", device, err)
			}
		}
	}
	klog.V(4).InfoS("Mount", "device", device, "target", target, "fsType", fsType, "options", options)
	return sysMount(device, target, fsType, options)
}

// BindMount bind-mounts source onto target (a directory or a file), read-only
// when ro.
func (m *Mounter) BindMount(source, target string, ro bool) error {
	return sysBind(source, target, ro)
}

// Unmount unmounts target.
func (m *Mounter) Unmount(target string) error {
	return sysUnmount(target)
}

// Mounts returns the current mount table.
func (m *Mounter) Mounts() ([]MountInfo, error) { return Mounts() }

// Mounts returns the current mount table of this process's namespace.
func Mounts() ([]MountInfo, error) {
	infos, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("reading mount table: %w", err)
	}
	out := make([]MountInfo, 0, len(infos))
	for _, i := range infos {
		out = append(out, MountInfo{
			Major: i.Major, Minor: i.Minor, Root: i.Root, MountPoint: i.Mountpoint,
			FsType: i.FSType, Source: i.Source, MountOptions: strings.Split(i.Options, ","),
		})
	}
	return out, nil
}

// Stats returns the usage of the filesystem mounted at path.
func (m *Mounter) Stats(path string) (Stats, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return Stats{}, fmt.Errorf("statfs %s: %w", path, err)
	}
	bs := st.Bsize
	s := Stats{
		TotalBytes:     int64(st.Blocks) * bs,
		AvailableBytes: int64(st.Bavail) * bs,
		UsedBytes:      int64(st.Blocks-st.Bfree) * bs,
		TotalInodes:    int64(st.Files),
		FreeInodes:     int64(st.Ffree),
		UsedInodes:     int64(st.Files - st.Ffree),
		ReadOnly:       st.Flags&unix.ST_RDONLY != 0,
	}
	return s, nil
}

// MountAt returns the topmost mount whose mount point is path, if any.
func MountAt(mounts []MountInfo, path string) (MountInfo, bool) {
	path = filepath.Clean(path)
	var found MountInfo
	ok := false
	for _, m := range mounts {
		if m.MountPoint == path {
			found, ok = m, true // later entries are mounted on top
		}
	}
	return found, ok
}

// IsDeviceMount reports whether m mounts a filesystem from the block device
// devPath with dev_t rdev (not a bind of its device node). btrfs reports an
// anonymous dev_t in the mount table, so its mounts are matched by source.
func IsDeviceMount(m MountInfo, devPath string, rdev uint64) bool {
	if uint32(m.Major) == unix.Major(rdev) && uint32(m.Minor) == unix.Minor(rdev) {
		return true
	}
	return m.FsType == "btrfs" && m.Source == devPath
}

// IsDeviceNodeBind reports whether m is a bind mount of the device node
// devPath (as /dev/loopN) taken from a devtmpfs.
func IsDeviceNodeBind(m MountInfo, devPath string) bool {
	return m.FsType == "devtmpfs" && m.Root == "/"+filepath.Base(devPath)
}

// ErrNotEmpty is returned when a CO-given path that Spool would create,
// mount on or remove already holds something: a file with content, a
// directory with entries, a link, a device. Spool never mounts over or
// removes what it did not make.
var ErrNotEmpty = errors.New("holds something Spool did not make")

// MakeFile creates an empty regular file to bind a device node onto; an
// existing empty regular file is fine. It never follows a link at path and
// never opens a FIFO or device found there.
func MakeFile(path string) error {
	fd, err := unix.Open(path, unix.O_CREAT|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o640)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EISDIR) {
			return fmt.Errorf("%s: %w (not a regular file)", path, ErrNotEmpty)
		}
		return fmt.Errorf("creating %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != 0 {
		return fmt.Errorf("%s: %w (a non-empty file or not a regular file)", path, ErrNotEmpty)
	}
	return nil
}

// MakeDir creates path (not its parents); an existing empty directory is
// fine, and so is one that holds only the entries named in allow (such as
// the block marker of an interrupted stage). Anything else at path (a
// directory with other entries, a file, a link) wraps ErrNotEmpty.
func MakeDir(path string, allow ...string) error {
	err := os.Mkdir(path, 0o750)
	if err == nil {
		return nil
	}
	if !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return fmt.Errorf("%s: %w (not a directory)", path, ErrNotEmpty)
		}
		return fmt.Errorf("checking %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	names, err := f.Readdirnames(len(allow) + 1)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	for _, n := range names {
		if !slices.Contains(allow, n) {
			return fmt.Errorf("%s: %w (the directory holds %q)", path, ErrNotEmpty, n)
		}
	}
	return nil
}

// RemoveEmpty removes path if it is an empty directory or an empty regular
// file; a missing path is fine. Anything else stays and wraps ErrNotEmpty:
// Spool removes only the targets it made, never what a CO, a pod or an
// administrator put at a path.
func RemoveEmpty(path string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR):
		return nil // no such path: nothing to remove
	case err != nil:
		return fmt.Errorf("checking %s: %w", path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		err = unix.Rmdir(path)
		if errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%s: %w (a directory with entries)", path, ErrNotEmpty)
		}
	case unix.S_IFREG:
		if st.Size != 0 {
			return fmt.Errorf("%s: %w (a file of %d bytes)", path, ErrNotEmpty, st.Size)
		}
		err = unix.Unlink(path)
	default:
		return fmt.Errorf("%s: %w (neither a directory nor a regular file)", path, ErrNotEmpty)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return nil
}
