package fs

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	utilexec "k8s.io/utils/exec"
)

var (
	// ErrDeviceInUse is returned by NewUUID when the device is mounted or
	// claimed exclusively by something else.
	ErrDeviceInUse = errors.New("device is mounted or in use")
	// ErrXFSDirtyLog is returned by NewUUID when the XFS log holds changes
	// that only a mount can replay (an image copied while it was mounted).
	// xfs_admin then leaves the UUID alone; mount such a copy with -o nouuid.
	ErrXFSDirtyLog = errors.New("xfs log is dirty; the UUID can only be changed after a mount replays it")
)

// NewUUID gives the unmounted filesystem of type fsType on device a new
// random UUID, so that a clone or snapshot restore can be mounted on the same
// node as its origin.
//
//   - ext4: tune2fs -U random; when tune2fs asks for a freshly checked
//     filesystem (metadata_csum without metadata_csum_seed and mounted since
//     the last check, or a journal to recover) e2fsck -f -p runs first.
//   - xfs: xfs_admin -U generate. It needs a clean log; with a dirty one
//     xfs_admin prints an error but exits 0, and NewUUID returns an error
//     wrapping ErrXFSDirtyLog.
//   - btrfs: btrfstune -f -u (rewrites the fsid in every tree block; -f skips
//     the confirmation prompt).
//
// The device must not be mounted (in the mount table of this process) nor
// claimed exclusively (a mount in another namespace, device-mapper, mkfs...),
// and must hold a filesystem of type fsType. NewUUID checks that the UUID
// really changed.
func (m *Mounter) NewUUID(device, fsType string) error {
	var change func(string) error
	switch fsType {
	case "ext4":
		change = newExt4UUID
	case "xfs":
		change = newXFSUUID
	case "btrfs":
		change = newBtrfsUUID
	default:
		return fmt.Errorf("new UUID on %s: filesystem type %q is not supported", device, fsType)
	}
	dev, err := checkUnused(device)
	if err != nil {
		return fmt.Errorf("new UUID on %s: %w", device, err)
	}
	found, err := m.Probe(dev)
	if err != nil {
		return fmt.Errorf("new UUID on %s: %w", device, err)
	}
	if found != fsType {
		return fmt.Errorf("new UUID on %s: the device holds %q, not %q", device, found, fsType)
	}
	old, err := m.UUID(dev)
	if err != nil {
		return fmt.Errorf("new UUID on %s: %w", device, err)
	}
	start := time.Now()
	if err := change(dev); err != nil {
		return fmt.Errorf("new UUID on %s (%s): %w", device, fsType, err)
	}
	uuid, err := m.UUID(dev)
	if err != nil {
		return fmt.Errorf("new UUID on %s: %w", device, err)
	}
	if uuid == "" || uuid == old {
		return fmt.Errorf("new UUID on %s (%s): the UUID is still %q after the change", device, fsType, uuid)
	}
	klog.V(4).InfoS("Gave filesystem a new UUID", "device", device, "fsType", fsType, "oldUUID", old, "uuid", uuid, "duration", time.Since(start))
	return nil
}

// checkUnused resolves device to a block device node and makes sure no
// filesystem on it is mounted and nothing holds it exclusively. It returns
// the resolved path.
func checkUnused(device string) (string, error) {
	dev, err := filepath.EvalSymlinks(device)
	if err != nil {
		return "", err
	}
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", dev, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return "", fmt.Errorf("%s is not a block device", dev)
	}
	mounts, err := Mounts()
	if err != nil {
		return "", err
	}
	for _, mi := range mounts {
		if IsDeviceMount(mi, dev, st.Rdev) {
			return "", fmt.Errorf("%w: %s is mounted at %s", ErrDeviceInUse, dev, mi.MountPoint)
		}
	}
	// O_EXCL on a block device fails with EBUSY while a filesystem (in any
	// mount namespace) or another exclusive opener holds it.
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return "", fmt.Errorf("%w: %s is held exclusively (mounted in another namespace, or claimed)", ErrDeviceInUse, dev)
		}
		return "", fmt.Errorf("open %s: %w", dev, err)
	}
	_ = unix.Close(fd)
	return dev, nil
}

func newExt4UUID(dev string) error {
	out, err := runTool("tune2fs", "-U", "random", dev)
	if err == nil {
		return nil
	}
	// "This operation requires a freshly checked filesystem. Please run
	// e2fsck -f on the filesystem."
	if !strings.Contains(out, "e2fsck") {
		return err
	}
	klog.V(4).InfoS("tune2fs asks for a filesystem check first", "device", dev, "output", strings.TrimSpace(out))
	if err := checkExt(dev); err != nil {
		return err
	}
	_, err = runTool("tune2fs", "-U", "random", dev)
	return err
}

// checkExt runs a full, non-interactive check of an unmounted ext
// filesystem, as tune2fs -U and offline resize2fs demand.
func checkExt(dev string) error {
	if _, err := runTool("e2fsck", "-f", "-p", dev); err != nil {
		// Exit status 1 (errors corrected, e.g. the journal was replayed)
		// and 2 (corrected, reboot advised for a mounted root) are fine.
		var ee utilexec.ExitError
		if !errors.As(err, &ee) || ee.ExitStatus()&^3 != 0 {
			return err
		}
	}
	return nil
}

func newXFSUUID(dev string) error {
	out, err := runTool("xfs_admin", "-U", "generate", dev)
	// xfs_admin reports a dirty log with status 0:
	// "ERROR: The filesystem has valuable metadata changes in a log which
	// needs to be replayed. Mount the filesystem to replay the log, ..."
	if strings.Contains(out, "metadata changes in a log") || strings.Contains(out, "log which needs to be replayed") {
		return fmt.Errorf("%w: xfs_admin -U generate %s: %s", ErrXFSDirtyLog, dev, strings.TrimSpace(out))
	}
	return err
}

func newBtrfsUUID(dev string) error {
	_, err := runTool("btrfstune", "-f", "-u", dev)
	return err
}

// UUID returns the filesystem UUID on device, "" if there is none.
func (m *Mounter) UUID(device string) (string, error) {
	out, err := execer.Command("blkid", "-p", "-s", "UUID", "-o", "value", device).CombinedOutput()
	if err != nil {
		// Exit status 2: nothing found (no filesystem, or no UUID).
		var ee utilexec.ExitError
		if errors.As(err, &ee) && ee.ExitStatus() == 2 {
			return "", nil
		}
		return "", fmt.Errorf("blkid -p -s UUID -o value %s: %w: %s", device, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}
