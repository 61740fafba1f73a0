package lifecycle

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

func ephemeralPublish(id, target string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	vc := map[string]string{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p"}
	for k, v := range attrs {
		vc[k] = v
	}
	return &csi.NodePublishVolumeRequest{VolumeId: id, TargetPath: target, VolumeCapability: csiclient.MountCap(""), VolumeContext: vc}
}

func (e *env) volumeCount() int {
	e.t.Helper()
	lv, err := e.c.ListVolumes(ctx(e.t), &csi.ListVolumesRequest{})
	if err != nil {
		e.t.Fatal(err)
	}
	return len(lv.GetEntries())
}

// An ephemeral inline volume is created by NodePublishVolume from its
// attributes and deleted by NodeUnpublishVolume.
func TestEphemeralVolume(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	id := "csi-0f3c2a9d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f"
	target := filepath.Join(e.dir, "pod-target")
	req := ephemeralPublish(id, target, map[string]string{"size": "48Mi", "fsType": "ext4"})
	for range 2 {
		if _, err := e.c.NodePublishVolume(c, req); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if e.c != nil {
			_, _ = e.c.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		}
	})
	data := randomBytes(t, 1<<20)
	if err := csiclient.WriteFile(filepath.Join(target, "scratch"), data); err != nil {
		t.Fatal(err)
	}
	if got := statfsTotal(t, target); got < 36<<20 || got > 48<<20 {
		t.Fatalf("ephemeral filesystem is %d bytes, want about 48 MiB", got)
	}
	// The pod's files are never devices or setuid programs on the node.
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		t.Fatal(err)
	}
	if st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 {
		t.Errorf("ephemeral volume mounted without nosuid,nodev (statfs flags %#x)", st.Flags)
	}
	if _, err := e.c.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}); err != nil {
		t.Fatal(err)
	}
	if n := e.volumeCount(); n != 1 {
		t.Fatalf("%d volumes while the ephemeral volume is published, want 1", n)
	}
	// The driver restarts while the pod runs: the volume stays.
	e.restart()
	c = ctx(t)
	if got := mustRead(t, filepath.Join(target, "scratch")); !bytes.Equal(got, data) {
		t.Fatal("ephemeral data changed across a driver restart")
	}
	for range 2 {
		if _, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target still exists: %v", err)
	}
	if n := e.volumeCount(); n != 0 {
		t.Fatalf("%d volumes after the ephemeral volume was unpublished, want 0", n)
	}

	bad := ephemeralPublish(id, target, map[string]string{"colour": "red"})
	if _, err := e.c.NodePublishVolume(c, bad); err == nil {
		t.Fatal("an unknown volume attribute was accepted")
	}
	if n := e.volumeCount(); n != 0 {
		t.Fatalf("a refused ephemeral publish left %d volumes", n)
	}
}

// An ephemeral publish interrupted after the volume was made (here: its
// mount is gone, its loop device left) leaves nothing after a restart.
func TestEphemeralCleanupAtStart(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	target := filepath.Join(e.dir, "pod-target")
	if _, err := e.c.NodePublishVolume(c, ephemeralPublish("csi-interrupted", target, nil)); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
	e.restart()
	if n := e.volumeCount(); n != 0 {
		t.Fatalf("%d volumes left after restart, want 0", n)
	}
	if _, err := e.c.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-interrupted", TargetPath: target}); err != nil {
		t.Fatalf("unpublishing the cleaned-up volume: %v", err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target still exists: %v", err)
	}
}

// The pod spec is untrusted: an ephemeral volume's size, pool and
// provisioning stay within the operator's limits, and ephemeral volumes
// count toward the node's attach limit. A refused publish leaves nothing.
func TestEphemeralLimits(t *testing.T) {
	e := newEnv(t)
	e.shutdown()
	e.opts.Pools = append(e.opts.Pools, pool.Spec{Name: "second", Dir: filepath.Join(e.dir, "second")})
	e.opts.MaxVolumesPerNode = 2
	e.start()
	c := ctx(t)
	// One ordinary staged volume already counts.
	v, err := e.c.Create(c, "ordinary", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	before := e.volumeCount()
	for name, attrs := range map[string]map[string]string{
		"too large":    {"size": "2Gi"},
		"thick":        {"size": "16Mi", "provisioning": "thick"},
		"other pool":   {"size": "16Mi", "pool": "second"},
		"huge":         {"size": "1Ei"},
		"default pool": {"size": "16Mi", "pool": "default", "provisioning": "thick"},
	} {
		target := filepath.Join(e.dir, "limit-target")
		_, err := e.c.NodePublishVolume(c, ephemeralPublish("csi-limit", target, attrs))
		wantCode(t, "ephemeral "+name, err, codes.InvalidArgument)
		if _, err := os.Lstat(target); err == nil {
			t.Errorf("ephemeral %s: the refused publish left %s", name, target)
		}
	}
	// Within the limits: the first fits, the second exceeds the node's
	// attach limit (the ordinary volume holds one of two).
	t1 := filepath.Join(e.dir, "eph-1")
	if _, err := e.c.NodePublishVolume(c, ephemeralPublish("csi-eph-1", t1, map[string]string{"size": "16Mi"})); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = e.c.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-eph-1", TargetPath: t1})
	})
	_, err = e.c.NodePublishVolume(c, ephemeralPublish("csi-eph-2", filepath.Join(e.dir, "eph-2"), map[string]string{"size": "16Mi"}))
	wantCode(t, "ephemeral volume beyond --max-volumes-per-node", err, codes.ResourceExhausted)
	if got := e.volumeCount(); got != before+1 {
		t.Fatalf("%d volumes after one accepted and six refused ephemeral publishes, want %d", got, before+1)
	}
}
