package lifecycle

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/test/csiclient"
)

// wantCode fails the test unless err has the gRPC code want.
func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if status.Code(err) != want {
		t.Errorf("%s: %v, want %s", what, err, want)
	}
}

// mountedAt reports whether something is mounted at path.
func mountedAt(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) > 4 && string(f[4]) == path {
			return true
		}
	}
	return false
}

// The staging and target paths belong to the CO: Spool mounts on and
// removes only what it made there. Existing files, non-empty directories,
// links and foreign mounts at those paths are refused and stay as they
// were, with a known volume ID and with an unknown one.
func TestCOPathsAreNotSpools(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	mc := csiclient.MountCap("ext4")
	v := e.publishNew(c, "co", 16<<20, mc, nil)
	bv := e.publishNew(c, "cob", 16<<20, csiclient.BlockCap(), nil)

	content := []byte("someone else's file")
	file := filepath.Join(e.dir, "file")
	if err := os.WriteFile(file, content, 0o600); err != nil {
		t.Fatal(err)
	}
	full := filepath.Join(e.dir, "full")
	if err := os.MkdirAll(filepath.Join(full, "sub"), 0o750); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(e.dir, "link")
	if err := os.Symlink(filepath.Join(e.dir, "elsewhere"), link); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(e.dir, "foreign")
	if err := os.Mkdir(foreign, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", foreign, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(foreign, unix.MNT_DETACH) })
	unchanged := func() {
		t.Helper()
		if b, err := os.ReadFile(file); err != nil || !bytes.Equal(b, content) {
			t.Errorf("the file at %s changed: %q, %v", file, b, err)
		}
		if _, err := os.Stat(filepath.Join(full, "sub")); err != nil {
			t.Errorf("the directory %s lost its entry: %v", full, err)
		}
		if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Errorf("the link %s changed: %v", link, err)
		}
		if _, err := os.Lstat(filepath.Join(e.dir, "elsewhere")); err == nil {
			t.Error("a call followed the link and made its target")
		}
		if !mountedAt(t, foreign) {
			t.Errorf("the foreign mount at %s is gone", foreign)
		}
	}

	// Unknown volume IDs: NotFound, the path untouched. "csi-…" IDs are
	// ephemeral-shaped and take the vanished-ephemeral path.
	// The other ID differs from v.ID in its last hex digit (a fixed
	// replacement would be v.ID itself one time in 16).
	other := v.ID[:len(v.ID)-1] + "f"
	if other == v.ID {
		other = v.ID[:len(v.ID)-1] + "0"
	}
	for _, id := range []string{"csi-0123456789abcdef", other} {
		for _, p := range []string{file, full, link, foreign} {
			_, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: p})
			wantCode(t, "NodeUnpublishVolume("+id+", "+p+")", err, codes.NotFound)
		}
	}
	// A known volume: the paths hold what the volume did not make.
	for _, p := range []string{file, full, link, foreign} {
		_, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: p})
		wantCode(t, "NodeUnpublishVolume("+p+")", err, codes.FailedPrecondition)
		_, err = e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: p, VolumeCapability: mc, PublishContext: v.PublishContext})
		if p == foreign {
			wantCode(t, "NodePublishVolume("+p+")", err, codes.AlreadyExists)
		} else {
			wantCode(t, "NodePublishVolume("+p+")", err, codes.FailedPrecondition)
		}
		_, err = e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: bv.ID, StagingTargetPath: bv.Staging, TargetPath: p, VolumeCapability: bv.Cap, PublishContext: bv.PublishContext})
		if p == foreign {
			wantCode(t, "NodePublishVolume(block, "+p+")", err, codes.AlreadyExists)
		} else {
			wantCode(t, "NodePublishVolume(block, "+p+")", err, codes.FailedPrecondition)
		}
		// Not staged there, and in use where it is staged.
		_, err = e.c.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: p})
		wantCode(t, "NodeUnstageVolume("+p+")", err, codes.FailedPrecondition)
	}
	// A volume with no loop device: nothing proves a mount is its own.
	idle, err := e.c.Create(c, "idle", 16<<20, mc, nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(idle)
	_, err = e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: idle.ID, TargetPath: foreign})
	wantCode(t, "NodeUnpublishVolume(unstaged volume, "+foreign+")", err, codes.FailedPrecondition)
	// A second stage at a non-empty directory or a file.
	for _, p := range []string{file, full, link} {
		_, err := e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: p, VolumeCapability: mc, PublishContext: v.PublishContext})
		if status.Code(err) == codes.OK {
			t.Errorf("NodeStageVolume(%s) succeeded", p)
		}
	}
	unchanged()
	// The volumes still work.
	if err := csiclient.WriteFile(filepath.Join(v.Target, "ok"), []byte("ok")); err != nil {
		t.Fatal(err)
	}
}

// A kubelet directory reached through a symbolic link: the mount table shows
// the link's target. Staging twice, publishing twice, unpublishing and
// unstaging leave nothing mounted and nothing behind.
func TestSymlinkedKubeletDirectory(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	real := filepath.Join(e.dir, "real-kubelet")
	if err := os.Mkdir(real, 0o750); err != nil {
		t.Fatal(err)
	}
	kubelet := filepath.Join(e.dir, "kubelet")
	if err := os.Symlink(real, kubelet); err != nil {
		t.Fatal(err)
	}
	for i, vc := range []*csi.VolumeCapability{csiclient.MountCap("ext4"), csiclient.BlockCap()} {
		v, err := e.c.Create(c, "linked"+strconv.Itoa(i), 16<<20, vc, nil, node, kubelet)
		if err != nil {
			t.Fatal(err)
		}
		e.cleanupVolume(v)
		for range 2 {
			if err := e.c.StageAndPublish(c, v); err != nil {
				t.Fatalf("stage and publish through %s: %v", kubelet, err)
			}
		}
		if vc.GetMount() != nil {
			if err := csiclient.WriteFile(filepath.Join(v.Target, "f"), []byte("data")); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.c.UnpublishAndUnstage(c, v); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile("/proc/self/mountinfo")
		if bytes.Contains(b, []byte(real)) {
			t.Fatalf("mounts left under %s:\n%s", real, b)
		}
		if _, err := os.Lstat(filepath.Join(real, filepath.Base(v.Target))); err == nil {
			t.Errorf("target %s left behind", v.Target)
		}
	}
}
