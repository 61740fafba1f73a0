package lifecycle

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

// loopChangeFd is LOOP_CHANGE_FD (linux/loop.h), which x/sys does not name.
const loopChangeFd = 0x4C06

// podIoctl reconfigures a published raw block device through its node, as
// a pod with the device could.
func podIoctl(t *testing.T, target string, fn func(fd int) error) {
	t.Helper()
	// Read-only opens suffice for the loop ioctls (and are all a read-only
	// device allows).
	fd, err := unix.Open(target, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := fn(fd); err != nil {
		t.Fatal(err)
	}
}

// A pod with a raw block volume can reconfigure its loop device through the
// device node. Spool re-verifies the device at publish, stats and health:
// autoclear (which would detach it under the pod) is cleared again,
// partition scanning is reported, and unstage still works.
func TestRawBlockDeviceReconfigured(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "raw", 16<<20, csiclient.BlockCap(), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(pool.VolumeDir(filepath.Join(e.dir, "pool"), v.ID), pool.ImageName)
	// The pod keeps the device open while it uses it: with autoclear set,
	// its last close would detach the device.
	pod, err := os.OpenFile(v.Target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	setFlags := func(flags uint32) {
		t.Helper()
		info, err := unix.IoctlLoopGetStatus64(int(pod.Fd()))
		if err == nil {
			info.Flags |= flags
			err = unix.IoctlLoopSetStatus64(int(pod.Fd()), info)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	setFlags(unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_PARTSCAN)
	if dev, err := loop.Find(img); err != nil || !dev.Autoclear || !dev.PartScan {
		t.Fatalf("the pod's reconfiguration did not take: %+v, %v", dev, err)
	}
	h, err := e.c.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: v.ID, VolumePublishPath: v.Target})
	if err != nil || !strings.Contains(h.String(), "DeviceReconfigured") || !strings.Contains(h.String(), "partition scanning") {
		t.Errorf("NodeGetVolumeHealth does not report the reconfigured device: %v, %v", h, err)
	}
	if dev, err := loop.Find(img); err != nil || dev.Autoclear {
		t.Errorf("autoclear was not cleared: %+v, %v", dev, err)
	}
	// Set again; a stats call (the kubelet's periodic one) clears it too.
	setFlags(unix.LO_FLAGS_AUTOCLEAR)
	if _, err := e.c.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.ID, VolumePath: v.Target}); err != nil {
		t.Fatal(err)
	}
	if dev, err := loop.Find(img); err != nil || dev.Autoclear {
		t.Errorf("autoclear was not cleared at NodeGetVolumeStats: %+v, %v", dev, err)
	}
	// The pod's last close no longer detaches the device under the volume.
	if err := pod.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := loop.Find(img); err != nil {
		t.Fatalf("the device was detached at the pod's close: %v", err)
	}
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatalf("unstage of a reconfigured device: %v", err)
	}
	if _, err := loop.Find(img); err == nil {
		t.Fatal("the device is still attached after unstage")
	}
}

// A read-only raw block device whose backing file a pod swapped
// (LOOP_CHANGE_FD) no longer matches its image: unstage still unmounts and
// detaches it, because it carries this node's tag.
func TestRawBlockBackingFileChanged(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "swapped", 16<<20, csiclient.BlockCap(), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	e.reattachReadOnly(c, v)
	other := filepath.Join(e.dir, "pods-own-file")
	if err := os.WriteFile(other, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(other)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	podIoctl(t, v.Target, func(fd int) error { return unix.IoctlSetInt(fd, loopChangeFd, int(f.Fd())) })
	if _, err := loop.Find(other); err != nil {
		t.Fatalf("LOOP_CHANGE_FD did not take: %v", err)
	}
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatalf("unstage of a device whose backing file was changed: %v", err)
	}
	if _, err := loop.Find(other); err == nil {
		t.Fatal("the swapped device is still attached after unstage")
	}
}
