package driver

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/spool-csi/spool/pkg/pool"
)

const testNode = "node-1"

func newTestDriver(t *testing.T, k *fakeKernel, mutate ...func(*Options)) *Driver {
	t.Helper()
	opts := Options{
		Endpoint: "unix:///tmp/unused.sock", NodeID: testNode, Version: "test",
		Pools: []pool.Spec{{Name: "default", Dir: filepath.Join(t.TempDir(), "pool"), Capacity: 1 << 30}},
	}
	for _, m := range mutate {
		m(&opts)
	}
	d, err := New(opts, k.kernel())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

func mountCap(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func createReq(name string, n int64, c *csi.VolumeCapability) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: n}, VolumeCapabilities: []*csi.VolumeCapability{c}}
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(toStatus(err)) != code {
		t.Fatalf("got %v, want code %s", err, code)
	}
}

func TestCreateVolume(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	r, err := d.CreateVolume(ctx, createReq("pvc-1", 10<<20+1, mountCap("ext4")))
	if err != nil {
		t.Fatal(err)
	}
	v := r.GetVolume()
	if v.GetCapacityBytes() != 11<<20 {
		t.Errorf("capacity %d, want 11 MiB (rounded up to whole MiB)", v.GetCapacityBytes())
	}
	if seg := v.GetAccessibleTopology()[0].GetSegments()["spool.csi.dev/node"]; seg != testNode {
		t.Errorf("topology %v", v.GetAccessibleTopology())
	}
	again, err := d.CreateVolume(ctx, createReq("pvc-1", 10<<20, mountCap("ext4")))
	if err != nil || again.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Fatalf("repeat: %v %v", again, err)
	}
	_, err = d.CreateVolume(ctx, createReq("pvc-1", 20<<20, mountCap("ext4")))
	wantCode(t, err, codes.AlreadyExists)
	_, err = d.CreateVolume(ctx, createReq("pvc-1", 10<<20, blockCap()))
	wantCode(t, err, codes.AlreadyExists)

	for name, req := range map[string]*csi.CreateVolumeRequest{
		"no name":        {VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}},
		"no caps":        {Name: "x"},
		"bad fs":         createReq("x", 1<<20, mountCap("ntfs")),
		"bad param":      {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, Parameters: map[string]string{"colour": "red"}},
		"bad prov":       {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, Parameters: map[string]string{"provisioning": "fat"}},
		"unknown pool":   {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, Parameters: map[string]string{"pool": "nope"}},
		"traversal pool": {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, Parameters: map[string]string{"pool": "../../etc"}},
		"negative":       {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, CapacityRange: &csi.CapacityRange{RequiredBytes: -1}},
		"bad mount opt":  {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{MountFlags: []string{"ro,bind"}}}, AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}},
		"multi node":     {Name: "x", VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}, AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}}}},
	} {
		_, err := d.CreateVolume(ctx, req)
		if status.Code(toStatus(err)) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	_, err = d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap("")},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}})
	wantCode(t, err, codes.OutOfRange)
	_, err = d.CreateVolume(ctx, createReq("huge", 1<<62, mountCap("")))
	wantCode(t, err, codes.ResourceExhausted)
	req := createReq("elsewhere", 1<<20, mountCap(""))
	req.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"spool.csi.dev/node": "node-2"}}}}
	_, err = d.CreateVolume(ctx, req)
	wantCode(t, err, codes.ResourceExhausted)
	if len(d.pools.byName["default"].List()) != 1 {
		t.Fatalf("failed requests left volumes behind: %v", d.pools.byName["default"].List())
	}
}

func TestPublishAndDelete(t *testing.T) {
	d := newTestDriver(t, newFakeKernel(), func(o *Options) { o.MaxVolumesPerNode = 1 })
	ctx := context.Background()
	r1, _ := d.CreateVolume(ctx, createReq("a", 1<<20, mountCap("")))
	r2, _ := d.CreateVolume(ctx, createReq("b", 1<<20, mountCap("")))
	id := r1.GetVolume().GetVolumeId()
	pub := &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: mountCap("")}
	p1, err := d.ControllerPublishVolume(ctx, pub)
	if err != nil {
		t.Fatal(err)
	}
	if p1.GetPublishContext()[ctxNode] != testNode || p1.GetPublishContext()[ctxGeneration] != "1" {
		t.Fatalf("publish context %v", p1.GetPublishContext())
	}
	p2, err := d.ControllerPublishVolume(ctx, pub)
	if err != nil || p2.GetPublishContext()[ctxGeneration] != "1" {
		t.Fatalf("repeated publish: %v %v", p2, err)
	}
	pub.Readonly = true
	_, err = d.ControllerPublishVolume(ctx, pub)
	wantCode(t, err, codes.AlreadyExists)
	_, err = d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: r2.GetVolume().GetVolumeId(), NodeId: testNode, VolumeCapability: mountCap("")})
	wantCode(t, err, codes.ResourceExhausted)
	_, err = d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "node-2", VolumeCapability: mountCap("")})
	wantCode(t, err, codes.NotFound)
	_, err = d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "default:node-1:000000000000000000000000", NodeId: testNode, VolumeCapability: mountCap("")})
	wantCode(t, err, codes.NotFound)

	lv, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(lv.GetEntries()) != 2 {
		t.Fatalf("ListVolumes: %v %v", lv, err)
	}
	for _, e := range lv.GetEntries() {
		if e.GetVolume().GetVolumeId() == id && (len(e.GetStatus().GetPublishedNodeIds()) != 1 || e.GetStatus().GetPublishedNodeIds()[0] != testNode) {
			t.Errorf("published nodes of %s: %v", id, e.GetStatus())
		}
	}

	_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := d.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: testNode}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: testNode}); err != nil {
		t.Fatalf("repeated unpublish: %v", err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{id, "fake-vol-id", "../../x"} {
		if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: bad}); err != nil {
			t.Errorf("DeleteVolume(%q): %v", bad, err)
		}
	}
	_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "other:node-9:000000000000000000000000"})
	wantCode(t, err, codes.FailedPrecondition)
}

func TestListVolumesPaging(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	for _, n := range []string{"a", "b", "c", "d", "e"} {
		if _, err := d.CreateVolume(ctx, createReq(n, 1<<20, mountCap(""))); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		r, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range r.GetEntries() {
			if seen[e.GetVolume().GetVolumeId()] {
				t.Fatalf("volume %s listed twice", e.GetVolume().GetVolumeId())
			}
			seen[e.GetVolume().GetVolumeId()] = true
		}
		token = r.GetNextToken()
		if token == "" {
			break
		}
		if pages > 5 {
			t.Fatal("paging does not end")
		}
	}
	if len(seen) != 5 {
		t.Fatalf("listed %d volumes, want 5", len(seen))
	}
	_, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "invalid-token"})
	wantCode(t, err, codes.Aborted)
}

func TestGetCapacity(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	if _, err := d.CreateVolume(ctx, createReq("a", 100<<20, mountCap(""))); err != nil {
		t.Fatal(err)
	}
	r, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r.GetAvailableCapacity() != (1<<30)-(100<<20) {
		t.Errorf("available %d, want 1 GiB - 100 MiB", r.GetAvailableCapacity())
	}
	r, err = d.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{"spool.csi.dev/node": "node-2"}}})
	if err != nil || r.GetAvailableCapacity() != 0 {
		t.Errorf("capacity on another node: %v %v", r, err)
	}
	r, err = d.GetCapacity(ctx, &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{mountCap("xfs")}})
	if err != nil || r.GetMinimumVolumeSize().GetValue() != 300<<20 {
		t.Errorf("xfs minimum: %v %v", r, err)
	}
}

// nodeFixture creates and attaches one volume for the node tests.
func nodeFixture(t *testing.T, c *csi.VolumeCapability) (*Driver, *fakeKernel, string, map[string]string, string) {
	t.Helper()
	k := newFakeKernel()
	d := newTestDriver(t, k)
	ctx := context.Background()
	r, err := d.CreateVolume(ctx, createReq("vol", 64<<20, c))
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	p, err := d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: c})
	if err != nil {
		t.Fatal(err)
	}
	return d, k, id, p.GetPublishContext(), t.TempDir()
}

func TestNodeFilesystemLifecycle(t *testing.T) {
	c := mountCap("ext4")
	d, k, id, pc, dir := nodeFixture(t, c)
	ctx := context.Background()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc}
	pub := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, PublishContext: pc}

	_, err := d.NodePublishVolume(ctx, pub)
	wantCode(t, err, codes.FailedPrecondition) // not staged yet
	for range 2 {
		if _, err := d.NodeStageVolume(ctx, stage); err != nil {
			t.Fatal(err)
		}
	}
	if k.attached() != 1 {
		t.Fatalf("%d loop devices after staging twice, want 1", k.attached())
	}
	for range 2 {
		if _, err := d.NodePublishVolume(ctx, pub); err != nil {
			t.Fatal(err)
		}
	}
	roPub := proto.Clone(pub).(*csi.NodePublishVolumeRequest)
	roPub.Readonly = true
	_, err = d.NodePublishVolume(ctx, roPub)
	wantCode(t, err, codes.AlreadyExists)
	if _, err := d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}); err != nil {
		t.Fatal(err)
	}
	_, err = d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: filepath.Join(dir, "elsewhere")})
	wantCode(t, err, codes.NotFound)
	before := len(k.mounts)
	_, err = d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition) // still published
	if len(k.mounts) != before {
		t.Fatalf("a refused unstage unmounted something: %v", k.mounts)
	}
	_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition)
	for range 2 {
		if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
		if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
	if k.attached() != 0 || len(k.mounts) != 0 {
		t.Fatalf("left %d loop devices and mounts %v", k.attached(), k.mounts)
	}
}

func TestNodeStageRefusals(t *testing.T) {
	c := mountCap("ext4")
	d, k, id, pc, dir := nodeFixture(t, c)
	ctx := context.Background()
	staging := filepath.Join(dir, "staging")
	stale := map[string]string{ctxNode: testNode, ctxGeneration: "7"}
	for name, pctx := range map[string]map[string]string{"missing": nil, "stale": stale, "other node": {ctxNode: "node-2", ctxGeneration: "1"}} {
		_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pctx})
		if status.Code(toStatus(err)) != codes.FailedPrecondition {
			t.Errorf("%s publish context: %v, want FailedPrecondition", name, err)
		}
	}
	// A device that holds another filesystem is never reformatted.
	img, _ := d.pools.byName["default"].ImagePath(id[len(id)-24:])
	dev, _ := k.attachPath(img)
	k.formats[dev.Path] = "xfs"
	_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc})
	wantCode(t, err, codes.FailedPrecondition)
	if k.formats[dev.Path] != "xfs" || len(k.mounts) != 0 {
		t.Fatalf("device changed: format %s, mounts %v", k.formats[dev.Path], k.mounts)
	}
	for name, req := range map[string]*csi.NodeStageVolumeRequest{
		"relative staging": {VolumeId: id, StagingTargetPath: "rel/path", VolumeCapability: c, PublishContext: pc},
		"no capability":    {VolumeId: id, StagingTargetPath: staging, PublishContext: pc},
		"no volume":        {StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc},
	} {
		if _, err := d.NodeStageVolume(ctx, req); status.Code(toStatus(err)) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	_, err = d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "../../etc/passwd", StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc})
	wantCode(t, err, codes.NotFound)
}

// A volume is staged only as it was made: an ext4 volume is neither a raw
// device nor an xfs filesystem, whatever the capability says.
func TestNodeStageKeepsTheRecordedKind(t *testing.T) {
	d, k, id, pc, dir := nodeFixture(t, mountCap("ext4"))
	ctx := context.Background()
	staging := filepath.Join(dir, "staging")
	for name, c := range map[string]*csi.VolumeCapability{"block": blockCap(), "xfs": mountCap("xfs")} {
		_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc})
		wantCode(t, err, codes.FailedPrecondition)
		if k.attached() != 0 || len(k.mounts) != 0 {
			t.Fatalf("%s: a refused stage left %d loop devices and mounts %v", name, k.attached(), k.mounts)
		}
	}
	// No fsType in the capability: the recorded one.
	if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap(""), PublishContext: pc}); err != nil {
		t.Fatal(err)
	}
	if opts := k.mountOpts[staging]; !slices.Contains(opts, "nosuid") || !slices.Contains(opts, "nodev") {
		t.Errorf("staging mount options %q, want nosuid and nodev", opts)
	}
}

// Clones and restores keep their origin's access type and filesystem: a
// block volume's bytes never become a filesystem the host mounts.
func TestCopiesKeepTheirOriginsKind(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	blk, err := d.CreateVolume(ctx, createReq("blk", 1<<20, blockCap()))
	if err != nil {
		t.Fatal(err)
	}
	ext, err := d.CreateVolume(ctx, createReq("ext", 1<<20, mountCap("ext4")))
	if err != nil {
		t.Fatal(err)
	}
	snap, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: blk.GetVolume().GetVolumeId(), Name: "blk-snap"})
	if err != nil {
		t.Fatal(err)
	}
	fromVol := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshot().GetSnapshotId()}}}
	for _, tc := range []struct {
		name string
		c    *csi.VolumeCapability
		src  *csi.VolumeContentSource
		want codes.Code
	}{
		{"clone of a block volume as a filesystem", mountCap("ext4"), fromVol(blk.GetVolume().GetVolumeId()), codes.InvalidArgument},
		{"restore of a block snapshot as a filesystem", mountCap(""), fromSnap, codes.InvalidArgument},
		{"clone of an ext4 volume as block", blockCap(), fromVol(ext.GetVolume().GetVolumeId()), codes.InvalidArgument},
		{"clone of an ext4 volume as xfs", mountCap("xfs"), fromVol(ext.GetVolume().GetVolumeId()), codes.InvalidArgument},
		{"restore of a block snapshot as block", blockCap(), fromSnap, codes.OK},
		{"clone of an ext4 volume as ext4", mountCap("ext4"), fromVol(ext.GetVolume().GetVolumeId()), codes.OK},
		{"clone of an ext4 volume with no fsType", mountCap(""), fromVol(ext.GetVolume().GetVolumeId()), codes.OK},
	} {
		req := createReq("copy-"+strings.ReplaceAll(tc.name, " ", "-"), 1<<20, tc.c)
		req.VolumeContentSource = tc.src
		_, err := d.CreateVolume(ctx, req)
		if status.Code(toStatus(err)) != tc.want {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.want)
		}
	}
}

func TestNodeBlockLifecycle(t *testing.T) {
	c := blockCap()
	d, k, id, pc, dir := nodeFixture(t, c)
	ctx := context.Background()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc}); err != nil {
		t.Fatal(err)
	}
	if len(k.formats) != 0 {
		t.Fatalf("block staging formatted the device: %v", k.formats)
	}
	if _, err := d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, PublishContext: pc}); err != nil {
		t.Fatal(err)
	}
	st, err := d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.GetUsage()[0].GetTotal() != 64<<20 {
		t.Fatalf("block stats: %v %v", st, err)
	}
	// Unstage while published is refused and takes nothing away.
	before := len(k.mounts)
	_, err = d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition)
	if len(k.mounts) != before {
		t.Fatalf("a refused unstage unmounted something: %v", k.mounts)
	}
	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if k.attached() != 0 || len(k.mounts) != 0 {
		t.Fatalf("left %d loop devices and mounts %v", k.attached(), k.mounts)
	}
}

func TestOptionsValidate(t *testing.T) {
	good := Options{Endpoint: "unix:///run/csi.sock", NodeID: "n", Pools: []pool.Spec{{Name: "a", Dir: "/x"}}, Version: "v"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Options){
		"tcp endpoint":  func(o *Options) { o.Endpoint = "tcp://0.0.0.0:9000" },
		"relative sock": func(o *Options) { o.Endpoint = "unix://csi.sock" },
		"no node":       func(o *Options) { o.NodeID = "" },
		"no pools":      func(o *Options) { o.Pools = nil },
		"dup pools":     func(o *Options) { o.Pools = append(o.Pools, o.Pools[0]) },
		"bad mode":      func(o *Options) { o.Mode = "both" },
		"no version":    func(o *Options) { o.Version = "" },
		"negative max":  func(o *Options) { o.MaxVolumesPerNode = -1 },
	} {
		o := good
		o.Pools = append([]pool.Spec(nil), good.Pools...)
		mut(&o)
		if err := o.Validate(); err == nil {
			t.Errorf("%s: Validate succeeded", name)
		}
	}
}

// An offline driver needs no endpoint, serves nothing, answers the
// controller calls directly and holds its pools' locks like a served one.
func TestNewOffline(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	opts := Options{NodeID: testNode, Version: "test", Pools: []pool.Spec{{Name: "default", Dir: dir}}}
	d, err := NewOffline(opts, Kernel{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r, err := d.CreateVolume(context.Background(), createReq("pv-1", 1<<20, mountCap("ext4")))
	if err != nil {
		t.Fatal(err)
	}
	if seg := r.GetVolume().GetAccessibleTopology()[0].GetSegments()[TopologyKey(DefaultDriverName)]; seg != testNode {
		t.Errorf("topology %v", r.GetVolume().GetAccessibleTopology())
	}
	if _, err := d.Listen(); err == nil {
		t.Error("an offline driver listened")
	}
	opts.Endpoint = "unix://" + filepath.Join(t.TempDir(), "csi.sock")
	if _, err := New(opts, newFakeKernel().kernel()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a second driver opened the pool an offline driver holds: %v", err)
	}
	if _, err := NewOffline(Options{Version: "test", Pools: opts.Pools}, Kernel{}); err == nil {
		t.Error("NewOffline without a node ID succeeded")
	}
}

// The CSI socket carries secrets: only its owner may connect, and a file
// that is not a socket is never replaced.
func TestSocketPermissions(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	d := newTestDriver(t, newFakeKernel(), func(o *Options) { o.Endpoint = "unix://" + sock })
	lis, err := d.Listen()
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	_ = lis.Close()

	notSock := filepath.Join(dir, "file")
	if err := os.WriteFile(notSock, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	d2 := newTestDriver(t, newFakeKernel(), func(o *Options) { o.Endpoint = "unix://" + notSock })
	if _, err := d2.Listen(); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(notSock); string(b) != "keep" {
		t.Fatal("the regular file was changed")
	}
}

func TestControllerExpandCodes(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	r, err := d.CreateVolume(ctx, createReq("grow", 64<<20, mountCap("ext4")))
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	exp := func(req, lim int64) (*csi.ControllerExpandVolumeResponse, error) {
		return d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: req, LimitBytes: lim}})
	}
	if r, err := exp(32<<20, 0); err != nil || r.GetCapacityBytes() != 64<<20 {
		t.Fatalf("asking for less than the volume has: %v %v, want the current size", r, err)
	}
	_, err = exp(32<<20, 48<<20)
	wantCode(t, err, codes.OutOfRange) // a limit below the current size would shrink it
	_, err = exp(-1, 0)
	wantCode(t, err, codes.InvalidArgument)
	_, err = exp(2<<30, 0)
	wantCode(t, err, codes.ResourceExhausted) // the pool holds 1 GiB
	_, err = exp(128<<20, 100<<20)
	wantCode(t, err, codes.OutOfRange)
	if r, err := exp(100<<20+1, 0); err != nil || r.GetCapacityBytes() != 101<<20 || !r.GetNodeExpansionRequired() {
		t.Fatalf("growing: %v %v", r, err)
	}
	_, err = d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.InvalidArgument)
	_, err = d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "default:node-1:000000000000000000000000", CapacityRange: &csi.CapacityRange{RequiredBytes: 1}})
	wantCode(t, err, codes.NotFound)
}

// serve runs d on its endpoint until the test ends and returns a client
// connection to it.
func serve(t *testing.T, d *Driver) *grpc.ClientConn {
	t.Helper()
	lis, err := d.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		d.Close()
	})
	conn, err := grpc.NewClient(d.opts.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}
