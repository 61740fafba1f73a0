package lifecycle

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

var (
	encrypted = map[string]string{driver.ParamEncryption: pool.EncryptionFscrypt}
	rightKey  = map[string]string{driver.SecretEncryptionKey: "lifecycle-master-key-0123456789abcdef-right"}
	wrongKey  = map[string]string{driver.SecretEncryptionKey: "lifecycle-master-key-0123456789abcdef-wrong"}
)

// plaintextIn reports whether the raw bytes of a volume's image hold the
// marker, after the filesystem wrote everything back.
func plaintextIn(t *testing.T, root, volID string, marker []byte) bool {
	t.Helper()
	unix.Sync()
	img, err := os.ReadFile(filepath.Join(pool.VolumeDir(root, volID), pool.ImageName))
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Contains(img, marker)
}

// holdMounts starts a process in a private copy of this mount namespace:
// its copies of the mounts keep their filesystems alive after this
// namespace unmounts them, so the test can look at a filesystem after
// NodeUnstageVolume is done with it. The process is stopped at cleanup.
func holdMounts(t *testing.T) (inNS func(args ...string) (string, error), stop func()) {
	t.Helper()
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Skipf("unshare: %v", err)
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}
	t.Cleanup(stop)
	pid := strconv.Itoa(cmd.Process.Pid)
	// Wait until the process is in its own namespace.
	self, _ := os.Readlink("/proc/self/ns/mnt")
	for i := 0; i < 100; i++ {
		if ns, err := os.Readlink("/proc/" + pid + "/ns/mnt"); err == nil && ns != self {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return func(args ...string) (string, error) {
		out, err := exec.Command("nsenter", append([]string{"-t", pid, "-m", "--"}, args...)...).CombinedOutput()
		return string(out), err
	}, stop
}

// An encrypted volume: what a pod writes is not in the image's bytes (a
// plain volume's are, so the search can find it); unstage removes the key
// from the filesystem, so the files are unreadable even where it stays
// mounted; a wrong key is refused with nothing left mounted or attached; the
// right key reads the data back after a restart of the driver; snapshots,
// restores, clones and expansion keep it readable with the same Secret.
func TestEncryptedVolume(t *testing.T) {
	requireMkfs(t, "ext4")
	e := newEnv(t)
	c := ctx(t)
	root := filepath.Join(e.dir, "pool")
	name, content := "marker-name-91c2", []byte("PLAINTEXT-MARKER-of-an-encrypted-volume-5d0e")

	plain, err := e.c.Create(c, "plain", 32<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(plain)
	if err := e.c.StageAndPublish(c, plain); err != nil {
		t.Fatal(err)
	}
	if err := csiclient.WriteFile(filepath.Join(plain.Target, name), content); err != nil {
		t.Fatal(err)
	}
	if !plaintextIn(t, root, plain.ID, content) {
		t.Fatal("the marker is not found in a plain volume's image: the search proves nothing")
	}
	if err := e.c.UnpublishAndUnstage(c, plain); err != nil {
		t.Fatal(err)
	}

	v, err := e.c.Create(c, "enc", 32<<20, csiclient.MountCap("ext4"), encrypted, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	v.Secrets = rightKey
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(v.Target)
	if err != nil || len(entries) != 0 {
		t.Fatalf("a new encrypted volume shows %v (%v), want an empty directory", entries, err)
	}
	if err := csiclient.WriteFile(filepath.Join(v.Target, name), content); err != nil {
		t.Fatal(err)
	}
	if plaintextIn(t, root, v.ID, content) || plaintextIn(t, root, v.ID, []byte(name)) {
		t.Fatal("the image of an encrypted volume holds the plaintext of a file or its name")
	}

	// Unstage while another mount namespace keeps the filesystem mounted
	// (the loop device stays busy until it lets go, and the unstage is
	// retried): the key is gone from the filesystem, and with it the
	// names and contents.
	inNS, release := holdMounts(t)
	if out, err := inNS("cat", filepath.Join(v.Staging, "data", name)); err != nil || out != string(content) {
		t.Fatalf("the held mount does not show the file before unstage: %q, %v", out, err)
	}
	if _, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: v.Target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging}); err == nil {
		t.Log("unstage detached the loop device although another namespace holds its filesystem")
	}
	out, err := inNS("ls", filepath.Join(v.Staging, "data"))
	if err != nil || strings.Contains(out, name) || strings.TrimSpace(out) == "" {
		t.Fatalf("after unstage the held mount lists %q (%v): want one encrypted name", out, err)
	}
	if out, err := inNS("cat", filepath.Join(v.Staging, "data", strings.TrimSpace(out))); err == nil || strings.Contains(out, string(content)) {
		t.Fatalf("after unstage a file of the volume reads %q (%v)", out, err)
	}
	release()
	if _, err := e.c.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging}); err != nil {
		t.Fatal(err)
	}

	// A wrong key: refused, nothing mounted, no loop device.
	v.Secrets = wrongKey
	_, err = e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: v.PublishContext, Secrets: wrongKey})
	wantCode(t, "NodeStage with a wrong key", err, codes.PermissionDenied)
	if strings.Contains(err.Error(), wrongKey[driver.SecretEncryptionKey]) {
		t.Fatal("the error holds the key")
	}
	if mountedAt(t, v.Staging) {
		t.Fatal("the staging path is mounted after a wrong key")
	}
	assertDetached(t, e, v)

	// The right key, after a restart of the driver.
	e.restart()
	c = ctx(t)
	v.Secrets = rightKey
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, filepath.Join(v.Target, name)); !bytes.Equal(got, content) {
		t.Fatalf("read back %q", got)
	}

	// Copies carry the salt: the same Secret opens them. A restore asks for
	// encryption, a clone does not: both are encrypted.
	snap := e.snapshot(c, "enc-snap", v.ID)
	restored, cv := e.publishNewWith(c, "enc-restored", 64<<20, v.Cap,
		&csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}}, encrypted, rightKey)
	clone, ccv := e.publishNewWith(c, "enc-clone", 32<<20, v.Cap,
		&csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.ID}}}, nil, rightKey)
	for _, copied := range []struct {
		v  *csiclient.Volume
		cv *csi.Volume
	}{{restored, cv}, {clone, ccv}} {
		if copied.cv.GetVolumeContext()[driver.ParamEncryption] != pool.EncryptionFscrypt {
			t.Fatalf("%s: volume context %v, want encryption", copied.v.ID, copied.cv.GetVolumeContext())
		}
		if got := mustRead(t, filepath.Join(copied.v.Target, name)); !bytes.Equal(got, content) {
			t.Fatalf("%s read back %q", copied.v.ID, got)
		}
	}
	if statfsTotal(t, restored.Target) < 48<<20 {
		t.Fatalf("the restore of 64 MiB holds a filesystem of %d bytes", statfsTotal(t, restored.Target))
	}

	// Expansion: while unstaged, ext4 grows at the next stage (online
	// growth needs CAP_SYS_RESOURCE, which TestOnlineExpansion covers; the
	// encryption changes nothing for resize2fs).
	before := statfsTotal(t, v.Target)
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: v.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: 96 << 20}}); err != nil {
		t.Fatal(err)
	}
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	if after := statfsTotal(t, v.Target); after < before+48<<20 {
		t.Fatalf("filesystem %d bytes after expanding from %d", after, before)
	}
	if got := mustRead(t, filepath.Join(v.Target, name)); !bytes.Equal(got, content) {
		t.Fatalf("read back after expansion %q", got)
	}
}
