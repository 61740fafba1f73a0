// Package fs is the only code that formats, mounts, unmounts and inspects
// filesystems. It wraps k8s.io/mount-utils for format-and-mount and reads the
// mount table from /proc/self/mountinfo.
package fs

import (
	"errors"
	"fmt"
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

// Probe returns the filesystem found on device, "" when it is blank.
func (m *Mounter) Probe(device string) (string, error) {
	f, err := m.safe.GetDiskFormat(device)
	if err != nil {
		return "", fmt.Errorf("probing %s: %w", device, err)
	}
	return f, nil
}

// FormatAndMount formats device with fsType when it is blank and mounts it
// at target. The caller has checked that the device is blank or holds fsType.
func (m *Mounter) FormatAndMount(device, target, fsType string, options, formatOptions []string) error {
	klog.V(4).InfoS("Format and mount", "device", device, "target", target, "fsType", fsType, "options", options)
	if err := m.safe.FormatAndMountSensitiveWithFormatOptions(device, target, fsType, options, nil, formatOptions); err != nil {
		return fmt.Errorf("format and mount %s on %s: %w", device, target, err)
	}
	return nil
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
	if err := m.safe.Mount(device, target, fsType, options); err != nil {
		return fmt.Errorf("mount %s on %s: %w", device, target, err)
	}
	return nil
}

// BindMount bind-mounts source onto target (a directory or a file), read-only
// when ro.
func (m *Mounter) BindMount(source, target string, ro bool) error {
	opts := []string{"bind"}
	if ro {
		opts = append(opts, "ro")
	}
	if err := m.safe.Mount(source, target, "", opts); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	return nil
}

// Unmount unmounts target.
func (m *Mounter) Unmount(target string) error {
	if err := m.safe.Unmount(target); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
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

// MakeFile creates an empty regular file to bind a device node onto; an
// existing file is fine.
func MakeFile(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY|unix.O_NOFOLLOW, 0o640)
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	return f.Close()
}

// MakeDir creates path (not its parents); an existing directory is fine.
func MakeDir(path string) error {
	err := os.Mkdir(path, 0o750)
	if err == nil || errors.Is(err, os.ErrExist) {
		fi, serr := os.Lstat(path)
		if serr != nil {
			return fmt.Errorf("checking %s: %w", path, serr)
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s exists and is not a directory", path)
		}
		return nil
	}
	return fmt.Errorf("creating %s: %w", path, err)
}
