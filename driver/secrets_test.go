package driver

import (
	"bytes"
	"context"
	"flag"
	iofs "io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/pool"
)

// Secrets passed to any RPC never reach the log, even at the most verbose
// level, while the calls themselves are logged.
func TestSecretsNeverLogged(t *testing.T) {
	const marker = "S3CRET-MARKER-7f1d"
	var buf bytes.Buffer
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for k, v := range map[string]string{"v": "10", "logtostderr": "false", "alsologtostderr": "false"} {
		if err := fs.Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	klog.SetOutput(&buf)
	t.Cleanup(func() {
		_ = fs.Set("v", "0")
		_ = fs.Set("logtostderr", "true")
		klog.SetOutput(nil)
	})

	k := newFakeKernel()
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	d, err := New(Options{Endpoint: "unix://" + sock, NodeID: testNode, Version: "test",
		Pools: []pool.Spec{{Name: "default", Dir: filepath.Join(dir, "pool"), Capacity: 1 << 30}}}, k.kernel())
	if err != nil {
		t.Fatal(err)
	}
	conn := serve(t, d)
	ctx := context.Background()
	cc, nc, gc := csi.NewControllerClient(conn), csi.NewNodeClient(conn), csi.NewGroupControllerClient(conn)

	// The volume is encrypted: its master key is a secret too, and goes
	// through key derivation, unlock and its errors.
	sec := map[string]string{"password": marker, "token": "x" + marker, SecretEncryptionKey: marker + strings.Repeat("k", 32)}
	wrongKey := map[string]string{SecretEncryptionKey: marker + strings.Repeat("w", 32)}
	shortKey := map[string]string{SecretEncryptionKey: marker}
	c := mountCap("ext4")
	cv, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{c}, Secrets: sec,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, Parameters: encParams})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.GetVolume().GetVolumeId()
	pub, err := cc.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: c, Secrets: sec})
	if err != nil {
		t.Fatal(err)
	}
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	// Successful and failing calls alike: errors are logged too.
	calls := []func() error{
		func() error {
			_, err := cc.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{c}, Secrets: sec})
			return err
		},
		func() error {
			_, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pub.GetPublishContext(), Secrets: shortKey})
			return err
		},
		func() error {
			_, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pub.GetPublishContext(), Secrets: sec})
			return err
		},
		func() error {
			_, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c, PublishContext: pub.GetPublishContext(), Secrets: wrongKey})
			return err
		},
		func() error {
			_, err := nc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, PublishContext: pub.GetPublishContext(), Secrets: sec})
			return err
		},
		func() error {
			_, err := nc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20}, Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"provisioning": "thin"}, Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id, Secrets: sec})
			return err
		},
		func() error { _, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{Secrets: sec}); return err },
		func() error {
			_, err := cc.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: "default:node-1:snap-000000000000000000000000", Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "nope", Secrets: sec})
			return err
		},
		func() error {
			_, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{id}, Secrets: sec})
			return err
		},
		func() error {
			_, err := gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "nope", Secrets: sec})
			return err
		},
		func() error {
			_, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "nope", Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: testNode, Secrets: sec})
			return err
		},
		func() error {
			_, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec})
			return err
		},
	}
	for i, call := range calls {
		if err := call(); err != nil && strings.Contains(err.Error(), marker) {
			t.Errorf("call %d: the error holds the secret: %v", i, err)
		}
	}
	// Nothing in the pool holds it either (the salt is not a secret). The
	// encrypted volume's metadata must be among the files read, or the
	// walk proves nothing.
	sawMeta := false
	err = filepath.WalkDir(filepath.Join(dir, "pool"), func(p string, e iofs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(marker)) {
			t.Errorf("%s holds the secret", p)
		}
		sawMeta = sawMeta || bytes.Contains(b, []byte(`"salt"`))
		return nil
	})
	if err != nil || !sawMeta {
		t.Errorf("walking the pool: %v; an encrypted volume's metadata read: %t", err, sawMeta)
	}
	klog.Flush()
	log := buf.String()
	if strings.Contains(log, marker) {
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, marker) {
				t.Errorf("secret in log line: %s", l)
			}
		}
	}
	for _, want := range []string{"/csi.v1.Controller/CreateVolume", "/csi.v1.Node/NodeStageVolume", "/csi.v1.GroupController/CreateVolumeGroupSnapshot", "stripped", "Unlocked encrypted volume", "does not unlock it", "bytes of key material"} {
		if !strings.Contains(log, want) {
			t.Errorf("log does not mention %q: the calls were not logged, so the check proves nothing", want)
		}
	}
}
