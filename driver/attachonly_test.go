package driver

import (
	"context"
	"path/filepath"
	"testing"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// The attach controller of node-local pools: controller mode, no pools.
func TestAttachOnlyController(t *testing.T) {
	ctrl := newTestDriver(t, newFakeKernel(), func(o *Options) { o.Mode, o.Pools = ModeController, nil })
	ctx := context.Background()
	caps, err := ctrl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range caps.GetCapabilities() {
		switch c.GetRpc().GetType() {
		case csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME, csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
			csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER:
		default:
			// Expansion, listing and the rest need the pool: advertising
			// them would make the resizer and the attacher call in vain.
			t.Errorf("attach controller advertises %s", c.GetRpc().GetType())
		}
	}
	const id = "default:node-1:0123456789abcdef01234567"
	resp, err := ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: mountCap("ext4"), Readonly: true})
	if err != nil {
		t.Fatal(err)
	}
	if pc := resp.GetPublishContext(); pc[ctxNode] != testNode || pc[ctxAttachedBy] != "node" || pc[ctxReadOnly] != "true" {
		t.Errorf("publish context %v", pc)
	}
	_, err = ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "node-2", VolumeCapability: mountCap("ext4")})
	wantCode(t, err, codes.NotFound)
	_, err = ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "../etc", NodeId: testNode, VolumeCapability: mountCap("ext4")})
	wantCode(t, err, codes.NotFound)
	multi := mountCap("ext4")
	multi.AccessMode.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	_, err = ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: multi})
	wantCode(t, err, codes.InvalidArgument) // local volumes serve one node
	if _, err := ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: testNode}); err != nil {
		t.Fatal(err)
	}
	_, err = ctrl.CreateVolume(ctx, createReq("v", 1<<20, mountCap("ext4")))
	if err == nil {
		t.Fatal("an attach controller created a volume without a pool")
	}
	// Every other call answers without a pool, and none panics.
	calls := []func() error{
		func() error { _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); return err },
		func() error { _, err := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); return err },
		func() error { _, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{}); return err },
		func() error { _, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); return err },
		func() error {
			_, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
			return err
		},
		func() error {
			_, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
			return err
		},
		func() error {
			_, err := ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			return err
		},
		func() error {
			_, err := ctrl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")}})
			return err
		},
	}
	for i, call := range calls {
		if err := call(); err != nil && status.Code(toStatus(err)) == codes.Internal {
			t.Errorf("call %d: %v", i, err)
		}
	}
}

// The node records the attachment a pool-less attach controller published,
// and releases it at unstage.
func TestNodeRecordsNodeLocalAttachment(t *testing.T) {
	k := newFakeKernel()
	d := newTestDriver(t, k)
	ctx := context.Background()
	c := mountCap("ext4")
	created, err := d.CreateVolume(ctx, createReq("v", 8<<20, c))
	if err != nil {
		t.Fatal(err)
	}
	id := created.GetVolume().GetVolumeId()
	pc := map[string]string{ctxNode: testNode, ctxReadOnly: "false", ctxAttachedBy: "node"}
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	for range 2 {
		if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pc}); err != nil {
			t.Fatal(err)
		}
	}
	_, got, err := d.pools.volume(id)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Attachments) != 1 || got.Attachments[0].Node != testNode || !got.Attachments[0].ByNode {
		t.Fatalf("attachments after stage: %+v", got.Attachments)
	}
	if _, err := d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, PublishContext: pc}); err != nil {
		t.Fatal(err)
	}
	// A publish context of another node is refused.
	other := map[string]string{ctxNode: "node-2", ctxReadOnly: "false", ctxAttachedBy: "node"}
	_, err = d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: filepath.Join(dir, "t2"), VolumeCapability: c, PublishContext: other})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, got, _ = d.pools.volume(id); len(got.Attachments) != 0 {
		t.Fatalf("attachments after unstage: %+v", got.Attachments)
	}
	if k.attached() != 0 {
		t.Fatalf("%d loop devices left", k.attached())
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

// csi-resizer shares the attach controller's socket; it exits unless
// NodeGetCapabilities says the node expands volumes.
func TestAttachOnlyControllerAnswersTheResizer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	d := newTestDriver(t, newFakeKernel(), func(o *Options) {
		o.Mode, o.Pools, o.Endpoint = ModeController, nil, "unix://"+sock
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	lis, err := d.Listen()
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- d.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	node := csi.NewNodeClient(conn)
	caps, err := node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := caps.GetCapabilities(); len(got) != 1 || got[0].GetRpc().GetType() != csi.NodeServiceCapability_RPC_EXPAND_VOLUME {
		t.Fatalf("node capabilities of an attach controller: %v", got)
	}
	_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "default:node-1:0123456789abcdef01234567"})
	wantCode(t, err, codes.Unimplemented)
}
