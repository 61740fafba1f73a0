package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

// A volume made by `spool volume create` is served by the driver that starts
// on the pool afterwards: the controller lists it as the manifest describes
// it, and the node stages and publishes it from the PV's fields alone (as the
// kubelet does), formatting it at its first stage; data written reads back
// after a restage. Needs root: real loop devices and mounts.
func TestCreatedVolumeIsServed(t *testing.T) {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	poolDir := filepath.Join(dir, "pool")
	p, err := pool.Open(pool.Spec{Name: "default", Dir: poolDir}, testNode)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()

	type made struct {
		fs  string
		res createResult
	}
	var vols []made
	for _, fsType := range []string{"ext4", "xfs", "btrfs", fsBlock} {
		if fsType != fsBlock {
			if _, err := exec.LookPath("mkfs." + fsType); err != nil {
				t.Logf("mkfs.%s is not installed: skipping %s", fsType, fsType)
				continue
			}
		}
		r := mustRun(t, 0, createArgs(poolDir, "--size", "32Mi", "--name", "pre-"+fsType, "--fs", fsType, "-o", "json")...)
		var res createResult
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
			t.Fatal(err)
		}
		vols = append(vols, made{fsType, res})
		// Like CreateVolume, create only makes the image: the filesystem is
		// made at the first stage.
		if head := readHead(t, poolDir, res.VolumeHandle); !bytes.Equal(head, make([]byte, len(head))) {
			t.Fatalf("%s: the new image is not blank", fsType)
		}
	}

	opts := driver.Options{
		Endpoint: "unix://" + filepath.Join(dir, "csi.sock"), NodeID: testNode, Version: "test",
		Pools: []pool.Spec{{Name: "default", Dir: poolDir}},
	}
	_, stop, err := csiclient.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	c, err := csiclient.Dial(opts.Endpoint)
	if err != nil {
		_ = stop()
		t.Fatal(err)
	}
	stopped := false
	shutdown := func() {
		if !stopped {
			stopped = true
			_ = c.Close()
			if err := stop(); err != nil {
				t.Errorf("driver: %v", err)
			}
		}
	}
	t.Cleanup(shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	info, err := c.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]*csi.Volume{}
	for _, e := range list.GetEntries() {
		listed[e.GetVolume().GetVolumeId()] = e.GetVolume()
	}
	if len(listed) != len(vols) {
		t.Fatalf("ListVolumes shows %d volumes, want %d", len(listed), len(vols))
	}

	for _, m := range vols {
		pv := m.res.PersistentVolume
		// The affinity is what NodeGetInfo reports: the scheduler puts the pod
		// on the node whose labels match it.
		req := pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0]
		if got := info.GetAccessibleTopology().GetSegments()[req.Key]; got != req.Values[0] || len(req.Values) != 1 {
			t.Fatalf("%s: PV affinity %+v, NodeGetInfo topology %v", m.fs, req, info.GetAccessibleTopology())
		}
		got, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: pv.Spec.CSI.VolumeHandle})
		if err != nil {
			t.Fatalf("%s: ControllerGetVolume: %v", m.fs, err)
		}
		v := got.GetVolume()
		if v.GetCapacityBytes() != m.res.CapacityBytes || !reflect.DeepEqual(v.GetVolumeContext(), pv.Spec.CSI.VolumeAttributes) ||
			listed[v.GetVolumeId()].GetCapacityBytes() != m.res.CapacityBytes {
			t.Fatalf("%s: the driver sees %v, the manifest says %+v", m.fs, v, pv.Spec)
		}
		t.Run(m.fs, func(t *testing.T) { stageFromPV(ctx, t, c, dir, pv) })
	}

	// With the driver stopped again, the command deletes what it made.
	shutdown()
	for _, m := range vols {
		mustRun(t, 0, "delete", "--pool", "default="+poolDir, "--node-id", testNode, m.res.VolumeHandle)
	}
	if dirs := volumeDirs(t, poolDir); len(dirs) != 0 {
		t.Fatalf("volumes left: %v", dirs)
	}
}

// readHead reads the first 1 MiB of a volume's image, where every
// filesystem keeps its superblock.
func readHead(t *testing.T, poolDir, handle string) []byte {
	t.Helper()
	id, err := volid.ParseKind(handle, volid.KindVolume)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(pool.VolumeDir(poolDir, id.Token), pool.ImageName))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, 1<<20)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// stageFromPV attaches, stages and publishes the volume of pv with the
// requests the external-attacher and the kubelet build from the PV, writes
// data, restages it, reads the data back and tears everything down.
func stageFromPV(ctx context.Context, t *testing.T, c *csiclient.Client, dir string, pv persistentVolume) {
	id := pv.Spec.CSI.VolumeHandle
	vc := csiclient.BlockCap()
	if pv.Spec.VolumeMode == "Filesystem" {
		vc = csiclient.MountCap(pv.Spec.CSI.FSType)
	}
	pub, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{
		VolumeId: id, NodeId: testNode, VolumeCapability: vc, VolumeContext: pv.Spec.CSI.VolumeAttributes,
	})
	if err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(dir, pv.Metadata.Name+"-staging")
	target := filepath.Join(dir, pv.Metadata.Name+"-target")
	stage := func() {
		t.Helper()
		if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
			VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc,
			PublishContext: pub.GetPublishContext(), VolumeContext: pv.Spec.CSI.VolumeAttributes,
		}); err != nil {
			t.Fatalf("NodeStageVolume: %v", err)
		}
		if _, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
			VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc,
			PublishContext: pub.GetPublishContext(), VolumeContext: pv.Spec.CSI.VolumeAttributes,
		}); err != nil {
			t.Fatalf("NodePublishVolume: %v", err)
		}
	}
	unstage := func() error {
		if _, err := c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			return err
		}
		_, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}
	t.Cleanup(func() {
		if err := unstage(); err != nil {
			t.Errorf("teardown: %v", err)
		}
		if _, err := c.ControllerUnpublishVolume(context.Background(), &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: testNode}); err != nil {
			t.Errorf("ControllerUnpublishVolume: %v", err)
		}
	})

	data := bytes.Repeat([]byte("pre-provisioned "), 64<<10) // 1 MiB
	stage()
	if pv.Spec.VolumeMode == "Block" {
		if err := csiclient.WriteAt(target, data, 4<<20); err != nil {
			t.Fatal(err)
		}
	} else if err := csiclient.WriteFile(filepath.Join(target, "data"), data); err != nil {
		t.Fatal(err)
	}
	if err := unstage(); err != nil {
		t.Fatal(err)
	}
	stage()
	got := make([]byte, len(data))
	if pv.Spec.VolumeMode == "Block" {
		f, err := os.Open(target)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.ReadAt(got, 4<<20)
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
	} else if got, err = os.ReadFile(filepath.Join(target, "data")); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data read back after restaging differs from what was written")
	}
}

// With --endpoint the commands go through the driver that serves the pool
// (and holds its lock): create, list and delete work on a live node.
func TestEndpointUsesTheRunningDriver(t *testing.T) {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	poolDir := filepath.Join(dir, "pool")
	endpoint := "unix://" + filepath.Join(dir, "csi.sock")
	_, stop, err := csiclient.Start(driver.Options{
		Endpoint: endpoint, NodeID: testNode, Version: "test",
		Pools: []pool.Spec{{Name: "default", Dir: poolDir}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("driver: %v", err)
		}
	})

	// Without --endpoint the pool is locked, and the error says what to do.
	if r := mustRun(t, 1, createArgs(poolDir, "--size", "8Mi", "--name", "live")...); !strings.Contains(r.stderr, "--endpoint") {
		t.Errorf("stderr %q does not point at --endpoint", r.stderr)
	}
	r := mustRun(t, 0, append(createArgs(poolDir, "--size", "8Mi", "--name", "live", "-o", "handle"), "--endpoint", endpoint)...)
	handle := strings.TrimSpace(r.stdout)
	if _, err := volid.ParseKind(handle, volid.KindVolume); err != nil {
		t.Fatalf("create printed %q: %v", r.stdout, err)
	}
	if n, err := os.Stat(filepath.Join(pool.VolumeDir(poolDir, handle), pool.ImageName)); err != nil || n.Size() != 8<<20 {
		t.Fatalf("image of %s: %v, %v", handle, n, err)
	}
	// The same name again is the same volume.
	if again := mustRun(t, 0, append(createArgs(poolDir, "--size", "8Mi", "--name", "live", "-o", "handle"), "--endpoint", endpoint)...); strings.TrimSpace(again.stdout) != handle {
		t.Errorf("repeated create gave %q, first %q", again.stdout, handle)
	}
	if l := mustRun(t, 0, "list", "--pool", "default="+poolDir, "--node-id", testNode, "--endpoint", endpoint, "-o", "handle"); strings.TrimSpace(l.stdout) != handle {
		t.Errorf("list shows %q, want %q", l.stdout, handle)
	}
	mustRun(t, 0, "delete", "--pool", "default="+poolDir, "--node-id", testNode, "--endpoint", endpoint, handle)
	if dirs := volumeDirs(t, poolDir); len(dirs) != 0 {
		t.Fatalf("volumes left: %v", dirs)
	}
	if r := mustRun(t, 2, "list", "--pool", "default="+poolDir, "--node-id", testNode, "--endpoint", "tcp://x"); !strings.Contains(r.stderr, "unix:///") {
		t.Errorf("bad endpoint: stderr %q", r.stderr)
	}
}
