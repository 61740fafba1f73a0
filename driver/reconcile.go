package driver

import (
	"fmt"
	"slices"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/metrics"
	"github.com/spool-csi/spool/pkg/pool"

	"k8s.io/klog/v2"
)

// start repairs what an interrupted run of the node plugin left, before it
// serves: orphan loop devices, orphan ephemeral volumes, the fences of
// shared volumes still staged; and registers the node in its shared pools.
func (d *Node) start() error {
	if err := d.detachOrphanLoops(); err != nil {
		return err
	}
	d.deleteOrphanEphemerals()
	if err := d.adoptSharedStagings(); err != nil {
		return err
	}
	return d.registerSharedPools()
}

// detachOrphanLoops runs when the node service starts. A loop device of this
// node (ownedDevices) that nothing mounts or binds is
// a leftover of a stage that was interrupted (or of an unstage that crashed
// between unmount and detach): the CO will stage again, so the device is
// detached. Devices in use are left alone: pods keep their volumes across a
// restart of the plugin.
func (d *Node) detachOrphanLoops() error {
	devs, err := d.ownedDevices()
	if err != nil {
		return err
	}
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return err
	}
	for _, od := range devs {
		dev := od.Device
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
func (d *Node) thawIfFrozen(mounts []fs.MountInfo, dev *loop.Device) {
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

// ownedDevice is a loop device of this node and the volume it backs.
type ownedDevice struct {
	loop.Device
	pool  *pool.Pool
	token string // "" when the image was deleted
}

// ownedDevices lists the loop devices that belong to this node plugin. A
// device belongs to it when it carries this node's owner tag or none
// (loop.Device.OwnedBy), and is backed by the image of a volume of one of
// its pools, matched by identity (device and inode), not by path: a pool
// reached through a symlink, or seen at another path by a restarted
// container, still matches, and a file elsewhere that merely has an
// image's path never does. A device whose image was deleted belongs to it
// when it carries this node's tag, or no tag and the path of one of its
// pools' images.
func (d *Node) ownedDevices() ([]ownedDevice, error) {
	devs, err := d.kernel.Loops.List()
	if err != nil {
		return nil, fmt.Errorf("listing loop devices: %w", err)
	}
	devs = slices.DeleteFunc(devs, func(dev loop.Device) bool { return !dev.OwnedBy(d.loopOwner) })
	if len(devs) == 0 {
		return nil, nil // the usual case at start: nothing to match the images with
	}
	type owner struct {
		pool  *pool.Pool
		token string
	}
	images := map[pool.ImageID]owner{}
	for _, p := range d.pools.all() {
		for id, tok := range p.Images() {
			images[id] = owner{p, tok}
		}
	}
	var out []ownedDevice
	for _, dev := range devs {
		if o, ok := images[pool.ImageID{Dev: dev.BackingDev, Ino: dev.Inode}]; ok {
			out = append(out, ownedDevice{Device: dev, pool: o.pool, token: o.token})
			continue
		}
		if !dev.Deleted {
			continue
		}
		for _, p := range d.pools.all() {
			if dev.Owner == d.loopOwner || p.IsImage(dev.BackingFile) {
				out = append(out, ownedDevice{Device: dev, pool: p})
				break
			}
		}
	}
	return out, nil
}

// attachedLoops counts the loop devices of this node plugin.
func (d *Node) attachedLoops() (int, error) {
	devs, err := d.ownedDevices()
	return len(devs), err
}
