package lifecycle

import (
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/volid"
	"github.com/spool-csi/spool/test/csiclient"
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
