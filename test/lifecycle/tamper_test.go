package lifecycle

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/spool-csi/spool/pkg/cli"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

// The pool-tamper tier: whoever can write a pool directory (on a shared
// pool, anyone who can write the share) plants what Spool does not make
// there. The driver is then started or called; a sentinel outside the pool
// must stay byte for byte as it was, and no loop device may be backed by
// anything outside the pool.

// tamperEnv is a driver with one volume and a sentinel next to its pool.
type tamperEnv struct {
	*env
	sentinel string
	digest   string
	vol      *csiclient.Volume
	volDir   string // the volume's directory in the pool
}

func newTamperEnv(t *testing.T) *tamperEnv {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "victim", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	s := plantSentinel(t, e.dir)
	return &tamperEnv{env: e, sentinel: s, digest: treeDigest(t, s), vol: v,
		volDir: pool.VolumeDir(filepath.Join(e.dir, "pool"), v.ID)}
}

// check verifies the sentinel and the loop devices.
func (te *tamperEnv) check() {
	te.t.Helper()
	if treeDigest(te.t, te.sentinel) != te.digest {
		te.t.Fatal("the sentinel outside the pool changed")
	}
	devs, err := loop.List()
	if err != nil {
		te.t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.BackingFile, te.dir) && !strings.HasPrefix(d.BackingFile, filepath.Join(te.dir, "pool")+"/") {
			te.t.Fatalf("loop device %s is backed by %s, outside the pool", d.Path, d.BackingFile)
		}
	}
}

// replace swaps the volume's file name for what plant makes at its path.
func (te *tamperEnv) replace(name string, plant func(path string) error) {
	te.t.Helper()
	p := filepath.Join(te.volDir, name)
	if err := os.Rename(p, p+".orig"); err != nil {
		te.t.Fatal(err)
	}
	if err := plant(p); err != nil {
		te.t.Fatal(err)
	}
	te.t.Cleanup(func() {
		_ = os.Remove(p)
		_ = os.Rename(p+".orig", p)
	})
}

// An image replaced by a link, a hard link or a device is neither staged
// nor copied into a snapshot or clone, nor grown.
func TestTamperedImage(t *testing.T) {
	secret := "sentinel a/secret"
	for name, plant := range map[string]func(te *tamperEnv) func(string) error{
		"symlink": func(te *tamperEnv) func(string) error {
			return func(p string) error { return os.Symlink(filepath.Join(te.sentinel, "a", "secret"), p) }
		},
		"hard link": func(te *tamperEnv) func(string) error {
			return func(p string) error { return os.Link(filepath.Join(te.sentinel, "a", "secret"), p) }
		},
		"device": func(te *tamperEnv) func(string) error {
			return func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))) }
		},
	} {
		t.Run(name, func(t *testing.T) {
			te := newTamperEnv(t)
			c := ctx(t)
			te.replace(pool.ImageName, plant(te))
			_, err := te.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: te.vol.ID, StagingTargetPath: te.vol.Staging, VolumeCapability: te.vol.Cap, PublishContext: te.vol.PublishContext})
			wantCode(t, "NodeStageVolume", err, codes.FailedPrecondition)
			s, err := te.c.CreateSnapshot(c, &csi.CreateSnapshotRequest{Name: "stolen", SourceVolumeId: te.vol.ID})
			if err == nil {
				t.Errorf("CreateSnapshot of a tampered image succeeded: %v", s.GetSnapshot().GetSnapshotId())
			}
			_, err = te.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: "stolen-clone", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
				VolumeCapabilities:  []*csi.VolumeCapability{te.vol.Cap},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: te.vol.ID}}}})
			if err == nil {
				t.Error("a clone of a tampered image succeeded")
			}
			_, err = te.c.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: te.vol.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}})
			if err == nil {
				t.Error("ControllerExpandVolume of a tampered image succeeded")
			}
			h, err := te.c.ControllerGetVolumeHealth(c, &csi.ControllerGetVolumeHealthRequest{VolumeId: te.vol.ID})
			if err != nil || !strings.Contains(h.String(), "ImageMissing") {
				t.Errorf("ControllerGetVolumeHealth does not report the tampered image: %v, %v", h, err)
			}
			// Nothing in the pool holds the sentinel's bytes.
			_ = filepath.Walk(filepath.Join(te.dir, "pool"), func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode().IsRegular() && fi.Size() < 1<<20 && !strings.HasSuffix(p, ".orig") {
					if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(secret)) && !os.SameFile(fi, mustStat(t, filepath.Join(te.sentinel, "a", "secret"))) {
						t.Errorf("%s holds the sentinel's bytes", p)
					}
				}
				return nil
			})
			te.check()
		})
	}
}

func mustStat(t *testing.T, p string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// The pool's own directories and lock replaced by links: the driver refuses
// to serve the pool (and spool volume list refuses to read it), and nothing
// outside the pool is removed or created.
func TestTamperedPoolDirectories(t *testing.T) {
	for _, name := range []string{".trash", ".tmp", "volumes", ".lock"} {
		t.Run(name, func(t *testing.T) {
			te := newTamperEnv(t)
			te.shutdown()
			target := filepath.Join(te.sentinel, "b")
			if name == ".lock" {
				target = filepath.Join(te.sentinel, "created-by-lock")
			}
			p := filepath.Join(te.dir, "pool", name)
			if err := os.Rename(p, p+".orig"); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			_, stop, err := csiclient.Start(te.opts)
			if err == nil {
				_ = stop()
				t.Fatalf("the driver served a pool whose %s is a symlink", name)
			}
			if !strings.Contains(err.Error(), name) {
				t.Errorf("the error does not name %s: %v", name, err)
			}
			var out, errOut strings.Builder
			if code := cli.Volume([]string{"list", "--pool", "default=" + filepath.Join(te.dir, "pool"), "--node-id", node}, &out, &errOut); code == 0 {
				t.Errorf("spool volume list read a pool whose %s is a symlink: %s", name, out.String())
			}
			te.check()
			if _, err := os.Lstat(filepath.Join(te.sentinel, "created-by-lock")); err == nil {
				t.Fatal("the lock symlink created a file outside the pool")
			}
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(p+".orig", p); err != nil {
				t.Fatal(err)
			}
			te.start()
		})
	}
}

// Metadata that does not hold together is reported and left alone: a
// negative size never turns into free capacity.
func TestTamperedMetadata(t *testing.T) {
	te := newTamperEnv(t)
	c := ctx(t)
	before, err := te.c.GetCapacity(c, &csi.GetCapacityRequest{})
	if err != nil {
		t.Fatal(err)
	}
	meta := filepath.Join(te.volDir, pool.MetadataName)
	b, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Replace(b, []byte(`"capacityBytes": 16777216`), []byte(`"capacityBytes": -1125899906842624`), 1)
	if bytes.Equal(b, bad) {
		t.Fatalf("metadata format changed: %s", b)
	}
	if err := os.WriteFile(meta, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.WriteFile(meta, b, 0o600) })
	te.restart()
	after, err := te.c.GetCapacity(c, &csi.GetCapacityRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The skipped volume no longer counts as provisioned (16 MiB more), but
	// its -1 PiB never becomes free space.
	if after.GetAvailableCapacity() > before.GetAvailableCapacity()+16<<20+1<<20 {
		t.Fatalf("available capacity went from %d to %d", before.GetAvailableCapacity(), after.GetAvailableCapacity())
	}
	if got, _ := os.ReadFile(meta); !bytes.Equal(got, bad) {
		t.Fatal("the invalid metadata was rewritten")
	}
	_, err = te.c.ControllerGetVolume(c, &csi.ControllerGetVolumeRequest{VolumeId: te.vol.ID})
	wantCode(t, "ControllerGetVolume of a volume with invalid metadata", err, codes.NotFound)
	h, err := te.c.NodeGetStorageHealth(c, &csi.NodeGetStorageHealthRequest{})
	if err != nil || !strings.Contains(h.String(), "InvalidObjects") || !strings.Contains(h.String(), te.vol.ID[len(te.vol.ID)-24:]) {
		t.Errorf("NodeGetStorageHealth does not report the invalid volume: %v, %v", h, err)
	}
	te.check()
	// Put the metadata back for the cleanup.
	if err := os.WriteFile(meta, b, 0o600); err != nil {
		t.Fatal(err)
	}
	te.restart()
}

// Loop devices belong to a volume by identity: a pool configured through a
// symbolic link still finds its orphans, and a device another node plugin
// on the same kernel attached (another owner tag) is never taken.
func TestLoopOwnershipByIdentity(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	orphan, err := e.c.Create(c, "orphan", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(orphan)
	other, err := e.c.Create(c, "other", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(other)
	img := func(v *csiclient.Volume) string {
		return filepath.Join(pool.VolumeDir(filepath.Join(e.dir, "pool"), v.ID), pool.ImageName)
	}
	dev, err := loop.Attach(img(orphan), loop.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = loop.Detach(dev.Path) })
	foreign, err := loop.Attach(img(other), loop.Options{Owner: "node-of-someone-else"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = loop.Detach(foreign.Path) })

	// The same pool, through a symlink.
	e.shutdown()
	link := filepath.Join(e.dir, "pool-link")
	if err := os.Symlink(filepath.Join(e.dir, "pool"), link); err != nil {
		t.Fatal(err)
	}
	e.opts.Pools[0].Dir = link
	e.start()
	if _, err := loop.Find(img(orphan)); err == nil {
		t.Errorf("orphan loop device %s survived a restart with the pool reached through a symlink", dev.Path)
	}
	if d, err := loop.Find(img(other)); err != nil || d.Path != foreign.Path {
		t.Fatalf("the device another node plugin attached was taken: %v", err)
	}
	// Staging the volume makes this node's own device beside the other's.
	if err := e.c.StageAndPublish(c, other); err != nil {
		t.Fatal(err)
	}
	devs, err := loop.List()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, d := range devs {
		if d.BackingFile == img(other) {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d loop devices back %s, want the other node plugin's and this one's", n, img(other))
	}
	if err := e.c.UnpublishAndUnstage(c, other); err != nil {
		t.Fatal(err)
	}
	if d, err := loop.Find(img(other)); err != nil || d.Path != foreign.Path {
		t.Fatalf("unstage detached the other node plugin's device: %v", err)
	}
}

// A volume's directory replaced by a link (to a copy of it outside the
// pool) while the driver runs: no call writes through the link, and the
// volume's image is not attached from there.
func TestTamperedVolumeDirectory(t *testing.T) {
	te := newTamperEnv(t)
	c := ctx(t)
	outside := filepath.Join(te.sentinel, "b", "c", "volume-copy")
	if err := os.MkdirAll(outside, 0o750); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{pool.MetadataName, pool.ImageName} {
		b, err := os.ReadFile(filepath.Join(te.volDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(outside, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	te.digest = treeDigest(t, te.sentinel)
	if err := os.Rename(te.volDir, te.volDir+".orig"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, te.volDir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = os.Remove(te.volDir)
		_ = os.Rename(te.volDir+".orig", te.volDir)
	})
	// Attach metadata changes: unpublish and publish again.
	_, _ = te.c.ControllerUnpublishVolume(c, &csi.ControllerUnpublishVolumeRequest{VolumeId: te.vol.ID, NodeId: node})
	_, _ = te.c.ControllerPublishVolume(c, &csi.ControllerPublishVolumeRequest{VolumeId: te.vol.ID, NodeId: node, VolumeCapability: te.vol.Cap})
	_, _ = te.c.ControllerModifyVolume(c, &csi.ControllerModifyVolumeRequest{VolumeId: te.vol.ID, MutableParameters: map[string]string{"provisioning": "thick"}})
	_, _ = te.c.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: te.vol.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}})
	_, err := te.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: te.vol.ID, StagingTargetPath: te.vol.Staging, VolumeCapability: te.vol.Cap, PublishContext: te.vol.PublishContext})
	if err == nil {
		t.Error("NodeStageVolume staged a volume whose directory is a link out of the pool")
	}
	te.check()
	// Put it back before the cleanup deletes the volume.
	if err := os.Remove(te.volDir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(te.volDir+".orig", te.volDir); err != nil {
		t.Fatal(err)
	}
}
