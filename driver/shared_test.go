package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
)

// sharedCluster is one shared pool directory with a controller and node
// plugins on "nodes" node-a and node-b, each a separate driver with its own
// (fake) kernel, as separate machines would have.
type sharedCluster struct {
	dir   string
	ctrl  *Driver
	nodes map[string]*Driver
	k     map[string]*fakeKernel
}

func newSharedCluster(t *testing.T) *sharedCluster {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "share")
	if _, err := pool.Init("nfs", dir); err != nil {
		t.Fatal(err)
	}
	spec := func(o *Options) { o.Pools = []pool.Spec{{Name: "nfs", Dir: dir, Shared: true}} }
	c := &sharedCluster{dir: dir, nodes: map[string]*Driver{}, k: map[string]*fakeKernel{}}
	c.ctrl = newTestDriver(t, newFakeKernel(), spec, func(o *Options) { o.Mode = ModeController; o.NodeID = "controller" })
	for _, n := range []string{"node-a", "node-b", "node-c"} {
		c.k[n] = newFakeKernel()
		c.nodes[n] = newTestDriver(t, c.k[n], spec, func(o *Options) { o.Mode = ModeNode; o.NodeID = n })
	}
	return c
}

// create makes a volume through the controller and returns its ID.
func (c *sharedCluster) create(t *testing.T, name string, vc *csi.VolumeCapability) string {
	t.Helper()
	r, err := c.ctrl.CreateVolume(context.Background(), createReq(name, 64<<20, vc))
	if err != nil {
		t.Fatal(err)
	}
	return r.GetVolume().GetVolumeId()
}

func (c *sharedCluster) publish(t *testing.T, id, node string, vc *csi.VolumeCapability) (map[string]string, error) {
	t.Helper()
	r, err := c.ctrl.ControllerPublishVolume(context.Background(), &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: vc})
	return r.GetPublishContext(), err
}

func (c *sharedCluster) stage(id, node string, vc *csi.VolumeCapability, pc map[string]string, staging string) error {
	_, err := c.nodes[node].NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc, PublishContext: pc})
	return err
}

func (c *sharedCluster) health(t *testing.T, id, node string) []*csi.VolumeHealth_VolumeHealthEntry {
	t.Helper()
	r, err := c.nodes[node].NodeGetVolumeHealth(context.Background(), &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetVolumeHealth().GetHealthStatuses()
}

func hasReason(es []*csi.VolumeHealth_VolumeHealthEntry, reason string) bool {
	for _, e := range es {
		if e.GetReason() == reason {
			return true
		}
	}
	return false
}

func TestSharedVolumeMovesBetweenNodes(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	vc := mountCap("ext4")
	r, err := c.ctrl.CreateVolume(ctx, createReq("pvc-1", 64<<20, vc))
	if err != nil {
		t.Fatal(err)
	}
	v := r.GetVolume()
	id := v.GetVolumeId()
	if got := v.GetAccessibleTopology()[0].GetSegments(); len(got) != 1 || got["spool.csi.dev/pool-nfs"] != "present" {
		t.Fatalf("topology of a shared volume: %v", got)
	}
	for _, n := range []string{"node-a", "node-b"} {
		info, err := c.nodes[n].NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
		if err != nil {
			t.Fatal(err)
		}
		// Only shared pools here: no node key.
		if seg := info.GetAccessibleTopology().GetSegments(); len(seg) != 1 || seg["spool.csi.dev/pool-nfs"] != "present" {
			t.Fatalf("%s topology %v", n, seg)
		}
	}
	// A node with a local pool as well reports its node key too.
	both := newTestDriver(t, newFakeKernel(), func(o *Options) {
		o.Mode, o.NodeID = ModeNode, "node-d"
		o.Pools = []pool.Spec{{Name: "local", Dir: filepath.Join(t.TempDir(), "local")}, {Name: "nfs", Dir: c.dir, Shared: true}}
	})
	info, err := both.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if seg := info.GetAccessibleTopology().GetSegments(); len(seg) != 2 || seg["spool.csi.dev/pool-nfs"] != "present" || seg["spool.csi.dev/node"] != "node-d" {
		t.Fatalf("topology of a node with a local and a shared pool: %v", seg)
	}

	// A node that never registered (no node plugin sees the share there).
	if _, err := c.publish(t, id, "node-z", vc); status.Code(toStatus(err)) != codes.NotFound {
		t.Fatalf("publish to an unregistered node: %v", err)
	}
	pcA, err := c.publish(t, id, "node-a", vc)
	if err != nil {
		t.Fatal(err)
	}
	if pcA[ctxPoolID] == "" {
		t.Fatalf("publish context without the pool ID: %v", pcA)
	}
	stA, stB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	if err := c.stage(id, "node-a", vc, pcA, stA); err != nil {
		t.Fatal(err)
	}
	// B may neither be attached nor stage while A holds the volume.
	if _, err := c.publish(t, id, "node-b", vc); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("publish to node-b while attached to node-a: %v", err)
	}
	pcFake := map[string]string{ctxNode: "node-b", ctxGeneration: pcA[ctxGeneration], ctxPoolID: pcA[ctxPoolID]}
	for name, pc := range map[string]map[string]string{"node-a's": pcA, "forged": pcFake} {
		if err := c.stage(id, "node-b", vc, pc, stB); status.Code(toStatus(err)) != codes.FailedPrecondition {
			t.Fatalf("stage on node-b with %s publish context: %v", name, err)
		}
	}
	// Nor with a context that claims a node-local attach.
	nodeLocal := map[string]string{ctxNode: "node-b", ctxAttachedBy: "node"}
	if err := c.stage(id, "node-b", vc, nodeLocal, stB); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("stage on node-b with a node-local publish context: %v", err)
	}
	if c.k["node-b"].attached() != 0 {
		t.Fatal("a refused stage attached a loop device")
	}
	if es := c.health(t, id, "node-a"); len(es) != 0 {
		t.Fatalf("node-a health while attached: %v", es)
	}

	// The move: unstage on A, detach from A, attach to B, stage on B.
	if _, err := c.nodes["node-a"].NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: stA}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	pcB, err := c.publish(t, id, "node-b", vc)
	if err != nil {
		t.Fatal(err)
	}
	if pcB[ctxGeneration] == pcA[ctxGeneration] {
		t.Fatalf("a new attachment reused generation %s", pcB[ctxGeneration])
	}
	if err := c.stage(id, "node-b", vc, pcB, stB); err != nil {
		t.Fatal(err)
	}
	// A's old publish context no longer stages anything.
	if err := c.stage(id, "node-a", vc, pcA, stA); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("stage with a stale publish context: %v", err)
	}
	if c.k["node-a"].attached() != 0 || c.k["node-b"].attached() != 1 {
		t.Fatalf("loop devices: node-a %d, node-b %d", c.k["node-a"].attached(), c.k["node-b"].attached())
	}
	// Deleting an attached shared volume is refused, from its pool's record.
	_, err = c.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition)
}

func TestSharedForceDetach(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	vc := blockCap()
	id := c.create(t, "pvc-1", vc)
	pcA, err := c.publish(t, id, "node-a", vc)
	if err != nil {
		t.Fatal(err)
	}
	stA := filepath.Join(t.TempDir(), "a")
	if err := c.stage(id, "node-a", vc, pcA, stA); err != nil {
		t.Fatal(err)
	}
	// node-a is gone (out-of-service taint, or the 6-minute force detach):
	// the attacher detaches it without NodeUnstage, and attaches to B.
	if _, err := c.ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	if !hasReason(c.health(t, id, "node-a"), reasonAttachmentLost) {
		t.Fatalf("node-a does not report the lost attachment: %v", c.health(t, id, "node-a"))
	}
	pcB, err := c.publish(t, id, "node-b", vc)
	if err != nil {
		t.Fatal(err)
	}
	stB := filepath.Join(t.TempDir(), "b")
	if err := c.stage(id, "node-b", vc, pcB, stB); err != nil {
		t.Fatal(err)
	}
	// node-a comes back: its staging is stale, and it cannot stage again.
	if !hasReason(c.health(t, id, "node-a"), reasonAttachmentLost) {
		t.Fatal("node-a forgot that it lost the attachment")
	}
	if err := c.stage(id, "node-a", vc, pcA, stA); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("stage on node-a after force detach: %v", err)
	}
	// Even attached to node-a again, its old staging is not the new one;
	// node-b, detached after it unstaged, has lost nothing.
	if _, err := c.nodes["node-b"].NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: stB}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "node-b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.publish(t, id, "node-a", vc); err != nil {
		t.Fatal(err)
	}
	if !hasReason(c.health(t, id, "node-a"), reasonAttachmentLost) {
		t.Fatal("node-a's stale staging passes for the new attachment")
	}
	if es := c.health(t, id, "node-b"); hasReason(es, reasonAttachmentLost) {
		t.Fatalf("node-b reports a lost attachment after a normal detach: %v", es)
	}
	// A restarted node-a plugin finds its loop device and still knows.
	spec := func(o *Options) { o.Pools = []pool.Spec{{Name: "nfs", Dir: c.dir, Shared: true}} }
	c.nodes["node-a"] = newTestDriver(t, c.k["node-a"], spec, func(o *Options) { o.Mode = ModeNode; o.NodeID = "node-a" })
	if !hasReason(c.health(t, id, "node-a"), reasonAttachmentLost) {
		t.Fatal("a restarted node-a forgot its stale staging")
	}
}

func TestSharedRacingControllers(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	spec := func(o *Options) { o.Pools = []pool.Spec{{Name: "nfs", Dir: c.dir, Shared: true}} }
	other := newTestDriver(t, newFakeKernel(), spec, func(o *Options) { o.Mode = ModeController; o.NodeID = "controller-2" })
	vc := mountCap("xfs")
	for i := range 20 {
		r, err := c.ctrl.CreateVolume(ctx, createReq("pvc-race-"+string(rune('a'+i)), 512<<20, vc))
		if err != nil {
			t.Fatal(err)
		}
		id := r.GetVolume().GetVolumeId()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j, ctrl := range []*Driver{c.ctrl, other} {
			node := []string{"node-a", "node-b"}[j]
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[j] = ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: vc})
			}()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			if err == nil {
				ok++
			} else if status.Code(toStatus(err)) != codes.FailedPrecondition {
				t.Fatalf("losing publish: %v, want FailedPrecondition", err)
			}
		}
		v, err := c.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		if ok != 1 || len(v.GetStatus().GetPublishedNodeIds()) != 1 {
			t.Fatalf("race %d: %d publishes succeeded, attached to %v; want exactly one", i, ok, v.GetStatus().GetPublishedNodeIds())
		}
	}
}

func TestSharedAccessModes(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	withMode := func(vc *csi.VolumeCapability, m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		vc.AccessMode.Mode = m
		return vc
	}
	rox := withMode(mountCap("ext4"), csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)
	id := c.create(t, "readers", rox)
	for _, n := range []string{"node-a", "node-b"} {
		pc, err := c.publish(t, id, n, rox)
		if err != nil {
			t.Fatal(err)
		}
		if pc[ctxReadOnly] != "true" {
			t.Fatalf("reader attachment of %s is not read-only: %v", n, pc)
		}
	}
	if _, err := c.publish(t, id, "node-c", mountCap("ext4")); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("a writer joined readers: %v", err)
	}

	rwxBlock := withMode(blockCap(), csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)
	disk := c.create(t, "cluster-disk", rwxBlock)
	for _, n := range []string{"node-a", "node-b"} {
		if _, err := c.publish(t, id, n, rox); err != nil {
			t.Fatal(err)
		}
		if _, err := c.publish(t, disk, n, rwxBlock); err != nil {
			t.Fatal(err)
		}
	}
	for name, vc := range map[string]*csi.VolumeCapability{
		"multi-writer filesystem":  withMode(mountCap("ext4"), csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER),
		"single-writer multi-node": withMode(mountCap("ext4"), csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER),
	} {
		_, err := c.ctrl.CreateVolume(ctx, createReq(name, 64<<20, vc))
		wantCode(t, err, codes.InvalidArgument)
	}
	// Local pools still serve one node.
	local := newTestDriver(t, newFakeKernel())
	_, err := local.CreateVolume(ctx, createReq("local-readers", 64<<20, withMode(mountCap("ext4"), csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)))
	wantCode(t, err, codes.InvalidArgument)
}

func TestSharedPoolMustBeTheSameShare(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	vc := mountCap("ext4")
	id := c.create(t, "pvc-1", vc)
	pc, err := c.publish(t, id, "node-a", vc)
	if err != nil {
		t.Fatal(err)
	}
	wrong := map[string]string{ctxNode: "node-a", ctxGeneration: pc[ctxGeneration], ctxPoolID: "0123456789abcdef01234567"}
	if err := c.stage(id, "node-a", vc, wrong, filepath.Join(t.TempDir(), "a")); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("stage with another pool's ID: %v", err)
	}
	// The share goes away on node-a (in this test: its identity file).
	identity := filepath.Join(c.dir, "spool-pool.json")
	data, err := os.ReadFile(identity)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(identity); err != nil {
		t.Fatal(err)
	}
	info, err := c.nodes["node-a"].NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := info.GetAccessibleTopology().GetSegments()["spool.csi.dev/pool-nfs"]; ok {
		t.Fatal("a node without the share reports its topology")
	}
	if err := c.stage(id, "node-a", vc, pc, filepath.Join(t.TempDir(), "a")); status.Code(toStatus(err)) != codes.FailedPrecondition {
		t.Fatalf("stage without the share: %v", err)
	}
	if c.k["node-a"].attached() != 0 {
		t.Fatal("a refused stage attached a loop device")
	}
	if err := os.WriteFile(identity, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.stage(id, "node-a", vc, pc, filepath.Join(t.TempDir(), "a")); err != nil {
		t.Fatal(err)
	}
}

// The controller of a shared pool grows images itself (controller
// expansion); the node then only grows the filesystem.
func TestSharedControllerExpansion(t *testing.T) {
	c := newSharedCluster(t)
	ctx := context.Background()
	vc := blockCap()
	id := c.create(t, "grow", vc)
	caps, err := c.ctrl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	expands := false
	for _, cp := range caps.GetCapabilities() {
		expands = expands || cp.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_EXPAND_VOLUME
	}
	if !expands {
		t.Fatal("the controller of a shared pool does not offer ControllerExpandVolume")
	}
	resp, err := c.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: vc})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetCapacityBytes() != 128<<20 {
		t.Fatalf("expanded to %d", resp.GetCapacityBytes())
	}
	fi, err := os.Stat(filepath.Join(pool.VolumeDir(c.dir, id), pool.ImageName))
	if err != nil || fi.Size() != 128<<20 {
		t.Fatalf("image after expansion: %v, %v", fi, err)
	}
	// A node sees the new size in the pool at once.
	v, err := c.nodes["node-a"].pools.byName["nfs"].Get(id[len("nfs::"):])
	if err != nil || v.CapacityBytes != 128<<20 {
		t.Fatalf("node-a reads %d bytes, %v", v.CapacityBytes, err)
	}
}

// deniedLoops is a kernel whose loop devices cannot be opened, as in the
// unprivileged container deploy/shared runs its controllers in.
type deniedLoops struct{ *fakeKernel }

var errDenied = errors.New("open /dev/loop0: mknod /dev/loop0: operation not permitted")

func (deniedLoops) Find(pool.ImageID, string) (*loop.Device, error) { return nil, errDenied }
func (deniedLoops) List() ([]loop.Device, error)                    { return nil, errDenied }

// A controller-only process leaves the kernel alone: a snapshot of a shared
// volume staged elsewhere, and its deletion, never look for a loop device
// (they failed with Internal in deploy/shared, where the controller's
// container could not open the node's loop devices it saw in sysfs).
func TestControllerModeLeavesKernelAlone(t *testing.T) {
	c := newSharedCluster(t)
	id := c.create(t, "pvc-busy", mountCap("ext4"))
	k := newFakeKernel()
	ctrl, err := New(Options{
		Endpoint: "unix:///tmp/unused.sock", NodeID: "controller-2", Version: "test", Mode: ModeController,
		Pools: []pool.Spec{{Name: "nfs", Dir: c.dir, Shared: true}},
	}, Kernel{Loops: deniedLoops{k}, Mounter: k, Crypt: k})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctrl.Close)
	ctx := context.Background()
	s, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: id})
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	if !s.GetSnapshot().GetReadyToUse() {
		t.Errorf("snapshot not ready: %v", s.GetSnapshot())
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.GetSnapshot().GetSnapshotId()}); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume: %v", err)
	}
	entries, err := os.ReadDir(pool.VolumesDir(c.dir))
	if err != nil || len(entries) != 0 {
		t.Errorf("volumes left in the pool: %v %v", entries, err)
	}
}

// A lock another process holds on one volume of a shared pool never delays
// another volume, and is waited for a bounded time: then the call is
// Aborted and the CO retries (issue 19, class 6: ControllerPublishVolume of
// an unrelated volume hung behind a blocking flock under a process-wide
// mutex).
func TestSharedLockHeldElsewhere(t *testing.T) {
	c := newSharedCluster(t)
	c.ctrl.opts.MaxVolumesPerNode = 8 // the attach limit took a process-wide mutex
	old := pool.LockWait
	pool.LockWait = 300 * time.Millisecond
	t.Cleanup(func() { pool.LockWait = old })
	vc := mountCap("ext4")
	held := c.create(t, "held", vc)
	free := c.create(t, "free", vc)
	// Another process (another open file description) holds held's lock.
	f, err := os.OpenFile(filepath.Join(pool.VolumeDir(c.dir, held), ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := c.publish(t, held, "node-a", vc)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond) // the held volume's publish is waiting now
	if _, err := c.publish(t, free, "node-a", vc); err != nil {
		t.Fatalf("publish of an unrelated volume: %v", err)
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Errorf("publish of an unrelated volume took %s while another volume's lock was held", d)
	}
	if err := <-done; status.Code(toStatus(err)) != codes.Aborted { // mapped at the edge
		t.Fatalf("publish of the locked volume: %v, want Aborted", err)
	}
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if _, err := c.publish(t, held, "node-a", vc); err != nil {
		t.Fatalf("publish once the lock is free: %v", err)
	}
}
