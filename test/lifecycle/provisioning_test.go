package lifecycle

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/volid"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

// allocated is the space a file holds on its filesystem.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestThickVolumeKeepsItsSpace: a thick volume's image is preallocated at
// CreateVolume, and formatting it at the first stage must not give the
// space back (mkfs discards the device unless told not to, and a loop
// device turns the discard into holes in the image); nor may the volume's
// life on the node after that.
func TestThickVolumeKeepsItsSpace(t *testing.T) {
	for fsType, size := range map[string]int64{"ext4": 512 << 20, "xfs": 512 << 20, "btrfs": 512 << 20} {
		t.Run(fsType, func(t *testing.T) {
			requireMkfs(t, fsType)
			e := newEnv(t)
			c := ctx(t)
			v, err := e.c.Create(c, "thick-"+fsType, size, csiclient.MountCap(fsType), map[string]string{"provisioning": "thick"}, node, e.dir)
			if v != nil {
				e.cleanupVolume(v)
			}
			if err != nil {
				t.Fatal(err)
			}
			id, err := volid.Parse(v.ID)
			if err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(e.dir, "pool", "volumes", id.Token, "disk.img")
			if got := allocated(t, img); got < size {
				t.Fatalf("after CreateVolume: %d bytes allocated, want the whole %d", got, size)
			}
			if err := e.c.StageAndPublish(c, v); err != nil {
				t.Fatal(err)
			}
			if got := allocated(t, img); got < size {
				t.Errorf("after the first stage (mkfs): %d bytes allocated of %d", got, size)
			}
			if err := e.c.UnpublishAndUnstage(c, v); err != nil {
				t.Fatal(err)
			}
			if got := allocated(t, img); got < size {
				t.Errorf("after unstage: %d bytes allocated of %d", got, size)
			}
		})
	}
}

// TestBtrfsImagesWithoutCopyOnWrite: on a btrfs pool a volume's image is
// nodatacow (imagecopy.MarkNoCOW), its snapshot and a volume restored
// from it are still reflinks and nodatacow too, and the restored volume
// holds the data.
func TestBtrfsImagesWithoutCopyOnWrite(t *testing.T) {
	requireMkfs(t, "btrfs")
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	poolDir := filepath.Join(mountPoolFS(t, dir, "btrfs", 1<<30), "pool")
	e := newEnvWithPool(t, dir, poolDir)
	c := ctx(t)
	v := e.publishNew(c, "nocow", 64<<20, csiclient.BlockCap(), nil)
	e.cleanupVolume(v)
	data := randomBytes(t, 4<<20)
	if err := csiclient.WriteAt(v.Target, data, 1<<20); err != nil {
		t.Fatal(err)
	}
	image := func(kind, id string) string {
		return filepath.Join(poolDir, kind, id[len(id)-24:], "disk.img")
	}
	noCOW := func(path string) bool {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return imagecopy.IsNoCOW(f)
	}
	if !noCOW(image("volumes", v.ID)) {
		t.Errorf("the volume's image keeps copy-on-write")
	}
	snap := e.snapshot(c, "nocow-snap", v.ID)
	method := func(meta string) string {
		var m struct {
			Method string
			Source struct{ Method string }
		}
		if err := json.Unmarshal(mustRead(t, meta), &m); err != nil {
			t.Fatal(err)
		}
		return m.Method + m.Source.Method
	}
	if got := method(filepath.Join(filepath.Dir(image("snapshots", snap.GetSnapshotId())), "snapshot.json")); got != "reflink" {
		t.Errorf("snapshot made by %q, want reflink", got)
	}
	if !noCOW(image("snapshots", snap.GetSnapshotId())) {
		t.Errorf("the snapshot's image keeps copy-on-write")
	}
	r := e.publishNew(c, "nocow-restored", 64<<20, csiclient.BlockCap(), &csi.VolumeContentSource{
		Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}})
	e.cleanupVolume(r)
	if got := method(filepath.Join(filepath.Dir(image("volumes", r.ID)), "volume.json")); got != "reflink" {
		t.Errorf("restore made by %q, want reflink", got)
	}
	if !noCOW(image("volumes", r.ID)) {
		t.Errorf("the restored volume's image keeps copy-on-write")
	}
	f, err := os.Open(r.Target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("the restored volume does not hold the data written before the snapshot")
	}
}
