package driver

import (
	"fmt"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/metrics"

	"k8s.io/klog/v2"
)

// detachOrphanLoops runs when the node service starts. A loop device backed
// by an image of one of this process's pools that nothing mounts or binds is
// a leftover of a stage that was interrupted (or of an unstage that crashed
// between unmount and detach): the CO will stage again, so the device is
// detached. Devices in use are left alone: pods keep their volumes across a
// restart of the plugin.
func (d *Driver) detachOrphanLoops() error {
	devs, err := d.kernel.Loops.List()
	if err != nil {
		return fmt.Errorf("listing loop devices: %w", err)
	}
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return err
	}
	for _, dev := range devs {
		if !d.ownsImage(dev.BackingFile) {
			continue
		}
		if users := deviceUsers(mounts, &dev); len(users) > 0 {
			klog.V(2).InfoS("Keeping loop device in use", "device", dev.Path, "image", dev.BackingFile, "usedAt", users)
			d.thawIfFrozen(mounts, &dev)
			continue
		}
		err := d.kernel.Loops.Detach(dev.Path)
		d.metrics.Reconciled(metrics.ActionDetachLoop, err)
		if err != nil {
			klog.ErrorS(err, "Could not detach an unused loop device", "device", dev.Path, "image", dev.BackingFile)
			continue
		}
		klog.InfoS("Detached loop device that nothing used (left by an interrupted stage or unstage)", "device", dev.Path, "image", dev.BackingFile)
	}
	return nil
}

// thawIfFrozen thaws the filesystem of dev if a snapshot or clone was
// interrupted while it was frozen: the kernel keeps it frozen after the
// process that froze it died, and every write in the pod would hang.
func (d *Driver) thawIfFrozen(mounts []fs.MountInfo, dev *loop.Device) {
	for _, m := range mounts {
		if !fs.IsDeviceMount(m, dev.Path, dev.Rdev) {
			continue
		}
		thawed, err := d.kernel.Mounter.Thaw(m.MountPoint)
		if thawed || err != nil {
			d.metrics.Reconciled(metrics.ActionThaw, err)
		}
		if err != nil {
			klog.ErrorS(err, "Could not thaw a filesystem", "device", dev.Path, "mount", m.MountPoint)
		} else if thawed {
			klog.InfoS("Thawed a filesystem left frozen by an interrupted snapshot or clone", "device", dev.Path, "mount", m.MountPoint)
		}
		return // freezing is per filesystem: one mount point thaws them all
	}
}

// ownsImage reports whether file is a volume image of one of this
// process's pools.
func (d *Driver) ownsImage(file string) bool {
	for _, p := range d.pools {
		if p.IsImage(file) {
			return true
		}
	}
	return false
}

// attachedLoops counts the loop devices backed by images of this process's
// pools.
func (d *Driver) attachedLoops() (int, error) {
	devs, err := d.kernel.Loops.List()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, dev := range devs {
		if d.ownsImage(dev.BackingFile) {
			n++
		}
	}
	return n, nil
}
