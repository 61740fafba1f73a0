package driver

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/spool-csi/spool/pkg/pool"
)

var encParams = map[string]string{ParamEncryption: pool.EncryptionFscrypt}

const (
	testMasterKey  = "0123456789abcdef0123456789abcdef-right"
	testWrongKey   = "0123456789abcdef0123456789abcdef-wrong"
	shortMasterKey = "0123456789abcdef0123456789abcde" // 31 bytes
)

func encReq(name string, c *csi.VolumeCapability, src *csi.VolumeContentSource) *csi.CreateVolumeRequest {
	r := createReq(name, 64<<20, c)
	r.Parameters, r.VolumeContentSource = encParams, src
	return r
}

// CreateVolume encrypts ext4 filesystem volumes only, records a salt, says
// so in the volume context; copies keep their origin's encryption.
func TestCreateEncryptedVolume(t *testing.T) {
	k := newFakeKernel()
	d := newTestDriver(t, k)
	ctx := context.Background()
	for name, req := range map[string]*csi.CreateVolumeRequest{
		"block": encReq("b", blockCap(), nil),
		"xfs":   encReq("x", mountCap("xfs"), nil),
		"btrfs": encReq("y", mountCap("btrfs"), nil),
		"luks":  {Name: "l", VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")}, Parameters: map[string]string{ParamEncryption: "luks"}},
	} {
		_, err := d.CreateVolume(ctx, req)
		wantCode(t, err, codes.InvalidArgument)
		if !strings.Contains(err.Error(), "ext4") && !strings.Contains(err.Error(), "fscrypt") {
			t.Errorf("%s: the message does not say what is supported: %v", name, err)
		}
	}
	for _, fsType := range []string{"ext4", ""} {
		r, err := d.CreateVolume(ctx, encReq("enc-"+fsType, mountCap(fsType), nil))
		if err != nil {
			t.Fatal(err)
		}
		if got := r.GetVolume().GetVolumeContext()[ParamEncryption]; got != pool.EncryptionFscrypt {
			t.Fatalf("volume context %v lacks the encryption", r.GetVolume().GetVolumeContext())
		}
	}
	r, _ := d.CreateVolume(ctx, encReq("enc", mountCap("ext4"), nil))
	id := r.GetVolume().GetVolumeId()
	_, v, err := d.pools.volume(id)
	if err != nil || v.Encryption == nil || len(v.Encryption.Salt) != 64 {
		t.Fatalf("metadata: %+v, %v", v.Encryption, err)
	}
	// Capabilities with encryption are confirmed for an encrypted volume
	// only.
	plainR, _ := d.CreateVolume(ctx, createReq("plain-vvc", 64<<20, mountCap("ext4")))
	for vid, want := range map[string]bool{id: true, plainR.GetVolume().GetVolumeId(): false} {
		vr, err := d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: vid, VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")}, Parameters: encParams})
		if err != nil || (vr.GetConfirmed() != nil) != want {
			t.Fatalf("ValidateVolumeCapabilities of %s with encryption: %v, %v; want confirmed %t", vid, vr, err, want)
		}
	}
	// The same name without encryption is another volume.
	_, err = d.CreateVolume(ctx, createReq("enc", 64<<20, mountCap("ext4")))
	wantCode(t, err, codes.AlreadyExists)
	g, err := d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
	if err != nil || g.GetVolume().GetVolumeContext()[ParamEncryption] != pool.EncryptionFscrypt {
		t.Fatalf("ControllerGetVolume: %v, %v", g, err)
	}

	s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.GetSnapshot().GetSnapshotId()}}}
	fromVol := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	for name, req := range map[string]*csi.CreateVolumeRequest{
		"restore asked encrypted": encReq("r1", mountCap("ext4"), fromSnap),
		"restore not asked":       {Name: "r2", VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")}, VolumeContentSource: fromSnap, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}},
		"clone":                   encReq("c1", mountCap("ext4"), fromVol),
	} {
		r, err := d.CreateVolume(ctx, req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, cv, _ := d.pools.volume(r.GetVolume().GetVolumeId())
		if cv.Encryption == nil || *cv.Encryption != *v.Encryption {
			t.Fatalf("%s: encryption %+v, want the origin's %+v", name, cv.Encryption, v.Encryption)
		}
		if _, err := d.CreateVolume(ctx, req); err != nil {
			t.Fatalf("%s repeated: %v", name, err)
		}
	}
	// An unencrypted origin cannot give an encrypted copy.
	pr, _ := d.CreateVolume(ctx, createReq("plain", 64<<20, mountCap("ext4")))
	ps, _ := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "ps", SourceVolumeId: pr.GetVolume().GetVolumeId()})
	_, err = d.CreateVolume(ctx, encReq("r3", mountCap("ext4"), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: ps.GetSnapshot().GetSnapshotId()}}}))
	wantCode(t, err, codes.InvalidArgument)

	// Inline ephemeral volumes carry no node-stage Secret.
	_, err = d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "csi-abc", TargetPath: filepath.Join(t.TempDir(), "t"), VolumeCapability: mountCap("ext4"),
		VolumeContext: map[string]string{"csi.storage.k8s.io/ephemeral": "true", ParamEncryption: pool.EncryptionFscrypt}})
	wantCode(t, err, codes.InvalidArgument)
}

// NodeStage checks the key before it attaches anything, formats with the
// encrypt feature, unlocks after mounting; a wrong key leaves nothing
// mounted or attached; publish binds the encrypted directory; unstage
// removes the key before it unmounts.
func TestNodeStageEncrypted(t *testing.T) {
	c := mountCap("ext4")
	k := newFakeKernel()
	d := newTestDriver(t, k)
	ctx := context.Background()
	r, err := d.CreateVolume(ctx, encReq("vol", c, nil))
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	p, err := d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: testNode, VolumeCapability: c})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stage := func(secrets map[string]string) error {
		_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c,
			PublishContext: p.GetPublishContext(), Secrets: secrets})
		return err
	}
	for name, sec := range map[string]map[string]string{
		"no secret":    nil,
		"other fields": {"password": testMasterKey},
		"short key":    {SecretEncryptionKey: shortMasterKey},
	} {
		err := stage(sec)
		wantCode(t, err, codes.InvalidArgument)
		if !strings.Contains(err.Error(), SecretEncryptionKey) || strings.Contains(err.Error(), shortMasterKey) || strings.Contains(err.Error(), testMasterKey) {
			t.Errorf("%s: %v", name, err)
		}
		if k.attached() != 0 || len(k.mounts) != 0 {
			t.Fatalf("%s: attached %d, mounts %v", name, k.attached(), k.mounts)
		}
	}
	if err := stage(map[string]string{SecretEncryptionKey: testMasterKey}); err != nil {
		t.Fatal(err)
	}
	dev := k.devs[firstImage(k)].Path
	if got := k.formatOpts[dev]; !slices.Equal(got, []string{"-O", "encrypt"}) {
		t.Fatalf("mkfs options %v", got)
	}
	if err := stage(map[string]string{SecretEncryptionKey: testMasterKey}); err != nil {
		t.Fatalf("staging again: %v", err)
	}
	err = stage(map[string]string{SecretEncryptionKey: testWrongKey})
	wantCode(t, err, codes.PermissionDenied)
	if _, err := d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, PublishContext: p.GetPublishContext()}); err != nil {
		t.Fatal(err)
	}
	mounts, _ := k.Mounts()
	if m := mounts[len(mounts)-1]; m.MountPoint != target || m.Root != "/"+encryptedDir {
		t.Fatalf("published %+v, want a bind of the encrypted directory", m)
	}
	_, err = d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition) // still published: the key stays
	if _, ok := k.keys[staging]; !ok {
		t.Fatal("a refused unstage removed the key")
	}
	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	k.cryptCalls = nil
	if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if want := []string{"lock " + staging, "unmount " + staging}; !slices.Equal(k.cryptCalls, want) {
		t.Fatalf("unstage calls %v, want %v", k.cryptCalls, want)
	}
	// A wrong key after a restart of the node: refused, nothing left.
	err = stage(map[string]string{SecretEncryptionKey: testWrongKey})
	wantCode(t, err, codes.PermissionDenied)
	if strings.Contains(err.Error(), testWrongKey) {
		t.Fatal("the error holds the key")
	}
	if k.attached() != 0 || len(k.mounts) != 0 {
		t.Fatalf("after a wrong key: attached %d, mounts %v", k.attached(), k.mounts)
	}
	if err := stage(map[string]string{SecretEncryptionKey: testMasterKey}); err != nil {
		t.Fatalf("the right key after a wrong one: %v", err)
	}
	if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
}

func firstImage(k *fakeKernel) pool.ImageID {
	for id := range k.devs {
		return id
	}
	return pool.ImageID{}
}
