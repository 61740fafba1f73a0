// Package lifecycle writes data through real published volumes, unstages
// them, restarts the driver, stages them again and reads the same bytes back.
package lifecycle

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

const node = "lifecycle-node"

// env is one test's driver, client and directories.
type env struct {
	t    *testing.T
	dir  string
	opts driver.Options
	d    *driver.Driver
	stop func() error
	c    *csiclient.Client
}

func newEnv(t *testing.T) *env {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	return newEnvWithPool(t, dir, filepath.Join(dir, "pool"))
}

// newEnvWithPool starts a driver whose pool lives in poolDir.
func newEnvWithPool(t *testing.T, dir, poolDir string) *env {
	e := &env{t: t, dir: dir, opts: driver.Options{
		Endpoint: "unix://" + filepath.Join(dir, "csi.sock"), NodeID: node, Version: "test",
		Pools: []pool.Spec{{Name: "default", Dir: poolDir}},
	}}
	e.start()
	t.Cleanup(e.shutdown)
	return e
}

func (e *env) start() {
	e.t.Helper()
	d, stop, err := csiclient.Start(e.opts)
	if err != nil {
		e.t.Fatal(err)
	}
	c, err := csiclient.Dial(e.opts.Endpoint)
	if err != nil {
		e.t.Fatal(err)
	}
	e.d, e.stop, e.c = d, stop, c
}

func (e *env) shutdown() {
	if e.c != nil {
		_ = e.c.Close()
		if err := e.stop(); err != nil {
			e.t.Errorf("driver: %v", err)
		}
		e.c = nil
	}
}

func (e *env) restart() {
	e.shutdown()
	e.start()
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// reattachReadOnly detaches v from the node, attaches it again read-only
// (ControllerPublishVolume with readonly), and stages and publishes it.
func (e *env) reattachReadOnly(c context.Context, v *csiclient.Volume) {
	e.t.Helper()
	if _, err := e.c.ControllerUnpublishVolume(c, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.ID, NodeId: node}); err != nil {
		e.t.Fatal(err)
	}
	pub, err := e.c.ControllerPublishVolume(c, &csi.ControllerPublishVolumeRequest{VolumeId: v.ID, NodeId: node, VolumeCapability: v.Cap, Readonly: true})
	if err != nil {
		e.t.Fatal(err)
	}
	v.PublishContext = pub.GetPublishContext()
	if err := e.c.StageAndPublish(c, v); err != nil {
		e.t.Fatal(err)
	}
}

// cleanupVolume tears a volume down even when the test failed half way.
func (e *env) cleanupVolume(v *csiclient.Volume) {
	e.t.Cleanup(func() {
		if e.c == nil {
			e.start()
		}
		c := context.Background()
		_ = e.c.UnpublishAndUnstage(c, v)
		if err := e.c.Delete(c, v, node); err != nil {
			e.t.Errorf("cleanup of %s: %v", v.ID, err)
		}
	})
}

func TestFilesystemDataSurvivesRestageAndRestart(t *testing.T) {
	for _, fsType := range []string{"ext4", "xfs", "btrfs"} {
		t.Run(fsType, func(t *testing.T) {
			if _, err := exec.LookPath("mkfs." + fsType); err != nil {
				t.Skipf("mkfs.%s is not installed", fsType)
			}
			e := newEnv(t)
			c := ctx(t)
			v, err := e.c.Create(c, "fs-"+fsType, 32<<20, csiclient.MountCap(fsType), nil, node, e.dir)
			if err != nil {
				t.Fatal(err)
			}
			e.cleanupVolume(v)
			if err := e.c.StageAndPublish(c, v); err != nil {
				t.Fatal(err)
			}
			data := randomBytes(t, 3<<20)
			if err := csiclient.WriteFile(filepath.Join(v.Target, "data"), data); err != nil {
				t.Fatal(err)
			}
			stats, err := e.c.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.ID, VolumePath: v.Target})
			if err != nil {
				t.Fatal(err)
			}
			wantUsages := 2
			if fsType == "btrfs" {
				wantUsages = 1 // no inode counts
			}
			if u := stats.GetUsage(); len(u) != wantUsages || u[0].GetUsed() < 3<<20 || u[len(u)-1].GetUsed() < 1 {
				t.Fatalf("stats after writing 3 MiB: %v", stats)
			}
			h, err := e.c.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: v.ID, VolumePublishPath: v.Target, StagingTargetPath: v.Staging})
			if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
				t.Fatalf("health of a good volume: %v, %v", h, err)
			}
			if err := e.c.UnpublishAndUnstage(c, v); err != nil {
				t.Fatal(err)
			}
			assertDetached(t, e, v)

			e.restart()
			c = ctx(t)
			if err := e.c.StageAndPublish(c, v); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(v.Target, "data"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("data read back after restage and restart differs from what was written")
			}
		})
	}
}

func TestXFSIsRoundedUpToItsMinimum(t *testing.T) {
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		t.Skip("mkfs.xfs is not installed")
	}
	e := newEnv(t)
	cv, err := e.c.CreateVolume(ctx(t), &csi.CreateVolumeRequest{
		Name: "small-xfs", CapacityRange: &csi.CapacityRange{RequiredBytes: 10 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{csiclient.MountCap("xfs")},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = e.c.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: cv.GetVolume().GetVolumeId()})
	})
	if got := cv.GetVolume().GetCapacityBytes(); got != 300<<20 {
		t.Fatalf("capacity %d, want 300 MiB", got)
	}
	_, err = e.c.CreateVolume(ctx(t), &csi.CreateVolumeRequest{
		Name: "capped-xfs", CapacityRange: &csi.CapacityRange{RequiredBytes: 10 << 20, LimitBytes: 100 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{csiclient.MountCap("xfs")},
	})
	if status.Code(err) != codes.OutOfRange {
		t.Fatalf("xfs volume capped below 300 MiB: %v, want OutOfRange", err)
	}
}

func TestBlockDataSurvivesRestageAndRestart(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "block", 16<<20, csiclient.BlockCap(), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	data := randomBytes(t, 1<<20)
	if err := csiclient.WriteAt(v.Target, data, 5<<20); err != nil {
		t.Fatal(err)
	}
	stats, err := e.c.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.ID, VolumePath: v.Target})
	if err != nil || stats.GetUsage()[0].GetTotal() != 16<<20 {
		t.Fatalf("block stats: %v, %v", stats, err)
	}
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatal(err)
	}
	assertDetached(t, e, v)
	if _, err := os.Stat(v.Target); !os.IsNotExist(err) {
		t.Fatalf("target file still exists after unpublish: %v", err)
	}
	e.restart()
	c = ctx(t)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	f, err := os.Open(v.Target)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if _, err := f.ReadAt(got, 5<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("block data read back differs from what was written")
	}
}

func TestStageRefusesWrongFilesystemAndStaleContext(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "mismatch", 32<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("mkfs.xfs"); err == nil {
		_, err := e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{
			VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: csiclient.MountCap("xfs"), PublishContext: v.PublishContext,
		})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("staging an ext4 volume as xfs: %v, want FailedPrecondition", err)
		}
		assertDetached(t, e, v)
	}
	stale := map[string]string{}
	for k, val := range v.PublishContext {
		stale[k] = val
	}
	stale["spool.csi.dev/generation"] = "999"
	_, err = e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{
		VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: stale,
	})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("staging with a stale publish context: %v, want FailedPrecondition", err)
	}
	assertDetached(t, e, v)
	// Deleting a published volume is refused until it is unpublished.
	if _, err := e.c.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: v.ID}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("deleting an attached volume: %v, want FailedPrecondition", err)
	}
}

func assertDetached(t *testing.T, e *env, v *csiclient.Volume) {
	t.Helper()
	devs, err := loop.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.BackingFile, e.dir+"/") {
			t.Fatalf("loop device %s still backs %s after unstage of %s", d.Path, d.BackingFile, v.ID)
		}
	}
}

// A stage interrupted between attaching the loop device and mounting it
// leaves a loop device nothing uses: the restarted node plugin detaches it,
// and keeps the devices that staged volumes still use.
func TestRestartDetachesOrphanLoopDevices(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	staged, err := e.c.Create(c, "staged", 16<<20, csiclient.BlockCap(), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(staged)
	if err := e.c.StageAndPublish(c, staged); err != nil {
		t.Fatal(err)
	}
	orphan, err := e.c.Create(c, "orphan", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(orphan)
	img := filepath.Join(pool.VolumeDir(filepath.Join(e.dir, "pool"), orphan.ID), pool.ImageName)
	dev, err := loop.Attach(img, loop.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = loop.Detach(dev.Path) })

	e.opts.MetricsAddress = "127.0.0.1:0"
	e.restart()
	if _, err := loop.Find(img); err == nil {
		t.Fatalf("orphan loop device %s survived the restart", dev.Path)
	}
	if m := scrape(t, e.d.MetricsAddr()); !strings.Contains(m, `spool_reconcile_total{action="detach_orphan_loop",result="ok"} 1`+"\n") ||
		!strings.Contains(m, "spool_attached_loop_devices 1\n") {
		t.Fatalf("metrics after the restart do not show one repair and one attached device:\n%s", m)
	}
	stagedImg := filepath.Join(pool.VolumeDir(filepath.Join(e.dir, "pool"), staged.ID), pool.ImageName)
	if _, err := loop.Find(stagedImg); err != nil {
		t.Fatalf("the loop device of a staged volume was detached: %v", err)
	}
	// The staged volume still works after the restart.
	if _, err := os.Stat(staged.Target); err != nil {
		t.Fatal(err)
	}
	if err := csiclient.WriteAt(staged.Target, []byte("still here"), 0); err != nil {
		t.Fatal(err)
	}
}

// A read-only attachment attaches the loop device read-only and mounts the
// filesystem read-only; a read-only NodePublish of a writable stage gives a
// read-only view.
func TestReadOnly(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	v, err := e.c.Create(c, "ro", 16<<20, csiclient.MountCap("ext4"), nil, node, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	e.cleanupVolume(v)
	if err := e.c.StageAndPublish(c, v); err != nil {
		t.Fatal(err)
	}
	data := randomBytes(t, 4096)
	if err := csiclient.WriteFile(filepath.Join(v.Target, "data"), data); err != nil {
		t.Fatal(err)
	}
	roTarget := filepath.Join(e.dir, "ro-view")
	if _, err := e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{
		VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: roTarget, VolumeCapability: v.Cap, PublishContext: v.PublishContext, Readonly: true,
	}); err != nil {
		t.Fatal(err)
	}
	if err := csiclient.WriteFile(filepath.Join(roTarget, "x"), data); !errors.Is(err, unix.EROFS) {
		t.Fatalf("writing through a read-only publish: %v, want EROFS", err)
	}
	// The read-only remount of the bind keeps the staging mount's flags.
	var st unix.Statfs_t
	if err := unix.Statfs(roTarget, &st); err != nil {
		t.Fatal(err)
	}
	if want := int64(unix.ST_RDONLY | unix.ST_NOSUID | unix.ST_NODEV); st.Flags&want != want {
		t.Errorf("read-only publish has statfs flags %#x, want ro,nosuid,nodev", st.Flags)
	}
	if _, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: roTarget}); err != nil {
		t.Fatal(err)
	}
	if err := e.c.UnpublishAndUnstage(c, v); err != nil {
		t.Fatal(err)
	}
	e.reattachReadOnly(c, v)
	dev, err := loop.Find(filepath.Join(pool.VolumeDir(filepath.Join(e.dir, "pool"), v.ID), pool.ImageName))
	if err != nil || !dev.ReadOnly {
		t.Fatalf("loop device of a read-only attachment: %+v, %v", dev, err)
	}
	got, err := os.ReadFile(filepath.Join(v.Target, "data"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reading a read-only volume: %v", err)
	}
	if err := csiclient.WriteFile(filepath.Join(v.Target, "x"), data); !errors.Is(err, unix.EROFS) {
		t.Fatalf("writing to a read-only attachment: %v, want EROFS", err)
	}
}

// scrape returns the spool_ lines of the metrics served at addr.
func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "spool_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n") + "\n"
}
