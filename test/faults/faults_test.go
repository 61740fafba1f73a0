//go:build faults

// Package faults kills the real driver binary (built with -tags faults) at
// named steps and at random moments, restarts it, retries what the CO was
// doing and checks that nothing is lost, half-made or leaked. Run it with
// make test-faults (root).
package faults

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	spoolfs "github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

const node = "faults-node"

var (
	binary string
	kills  atomic.Int64
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "spool-faults-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "spool")
	build := exec.Command("go", "build", "-tags", "faults", "-o", binary, "./cmd/spool")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building the fault-injection driver: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	fmt.Printf("fault injection: %d kills\n", kills.Load())
	os.Exit(code)
}

// harness runs one driver process at a time on a pool that outlives it.
type harness struct {
	t    *testing.T
	dir  string
	pool string
	// poolFlag is the driver's --pool flag.
	poolFlag string
	// shared: the pool is a shared one (poolFlag ends in ",shared").
	shared bool
	sock   string
	cmd    *exec.Cmd
	dead   chan struct{}
	c      *csiclient.Client
	base   int64 // allocated bytes of the empty pool
}

// newHarness makes a pool (a shared one, made as an operator does with
// spool pool init, when shared is set) and starts the driver on it.
func newHarness(t *testing.T, shared bool) *harness {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	h := &harness{t: t, dir: dir, pool: filepath.Join(dir, "pool"), sock: filepath.Join(dir, "csi.sock"), shared: shared}
	h.poolFlag = "default=" + h.pool
	if shared {
		if out, err := exec.Command(binary, "pool", "init", h.poolFlag).CombinedOutput(); err != nil {
			t.Fatalf("spool pool init: %v: %s", err, out)
		}
		h.poolFlag += ",shared"
	}
	t.Cleanup(func() {
		h.stop()
		if t.Failed() {
			forceCleanup(t, dir)
		}
	})
	h.start("")
	h.base = allocated(t, h.pool)
	return h
}

// onEachPool runs body on a local pool and on a shared one, whose steps
// also hold flock locks on the pool that a kill must release.
func onEachPool(t *testing.T, body func(*testing.T, *harness)) {
	for _, shared := range []bool{false, true} {
		name := "local"
		if shared {
			name = "shared"
		}
		t.Run(name, func(t *testing.T) { body(t, newHarness(t, shared)) })
	}
}

// start starts the driver; with point set it kills itself there.
func (h *harness) start(point string) {
	h.t.Helper()
	_ = os.Remove(h.sock)
	log, err := os.OpenFile(filepath.Join(h.dir, "spool.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		h.t.Fatal(err)
	}
	cmd := exec.Command(binary, "--endpoint", "unix://"+h.sock, "--node-id", node, "--pool", h.poolFlag, "-v", "2")
	cmd.Env = append(os.Environ(), "SPOOL_FAULT_POINT="+point)
	cmd.Stdout, cmd.Stderr = log, log
	// A group of its own, so that kill ends the children it runs (mount,
	// mkfs) with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	_ = log.Close()
	dead := make(chan struct{})
	go func() { _ = cmd.Wait(); close(dead) }()
	h.cmd, h.dead = cmd, dead
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The socket file appears at bind(2), a moment before listen(2):
		// only a connection proves the driver is serving.
		if conn, err := net.DialTimeout("unix", h.sock, time.Second); err == nil {
			_ = conn.Close()
			break
		}
		select {
		case <-dead:
			h.t.Fatalf("driver exited during start; see %s", filepath.Join(h.dir, "spool.log"))
		default:
		}
		if time.Now().After(deadline) {
			h.t.Fatal("driver did not create its socket within 10s")
		}
		time.Sleep(2 * time.Millisecond)
	}
	c, err := csiclient.Dial("unix://" + h.sock)
	if err != nil {
		h.t.Fatal(err)
	}
	h.c = c
}

// forceCleanup unmounts and detaches what a failed test left under dir, so
// that one failure does not leak into the machine.
func forceCleanup(t *testing.T, dir string) {
	mounts, err := spoolfs.Mounts()
	if err == nil {
		for i := len(mounts) - 1; i >= 0; i-- {
			if strings.HasPrefix(mounts[i].MountPoint, dir+"/") {
				_, _ = spoolfs.Thaw(mounts[i].MountPoint)
				_ = syscall.Unmount(mounts[i].MountPoint, 0)
			}
		}
	}
	if devs, err := loop.List(); err == nil {
		for _, d := range devs {
			if strings.HasPrefix(d.BackingFile, dir+"/") {
				_ = loop.Detach(d.Path)
			}
		}
	}
	t.Logf("cleaned up after the failure; the driver's log was %s", filepath.Join(dir, "spool.log"))
}

// kill sends SIGKILL to the driver and the processes it started (the
// driver may already have killed itself), and waits until none of them
// runs, as a container runtime or systemd does before a restart. A mount(8)
// left running could otherwise finish after the restarted driver read the
// mount table, and leave a bind of a loop device it had just detached.
func (h *harness) kill() {
	pgid := h.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-h.dead
	deadline := time.Now().Add(10 * time.Second)
	for groupRuns(pgid) {
		if time.Now().After(deadline) {
			h.t.Fatalf("processes of the driver's group %d still run 10s after SIGKILL", pgid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = h.c.Close()
	kills.Add(1)
}

// groupRuns reports whether a process of group pgid runs (zombies aside:
// they wait for a parent that may never reap them).
func groupRuns(pgid int) bool {
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // exited meanwhile
		}
		// "pid (comm) state ppid pgrp ...": comm may hold spaces and ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(b[i+1:]))
		if len(fields) >= 3 && fields[0] != "Z" && fields[2] == strconv.Itoa(pgid) {
			return true
		}
	}
	return false
}

// stop ends the driver gracefully.
func (h *harness) stop() {
	if h.cmd == nil {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.dead:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		<-h.dead
	}
	_ = h.c.Close()
	h.cmd = nil
}

// restart starts the driver again after a kill, with a fault point or none.
func (h *harness) restart(point string) {
	h.t.Helper()
	if h.cmd != nil {
		select {
		case <-h.dead:
			_ = h.c.Close()
		default:
			h.stop()
		}
	}
	h.start(point)
}

// crash runs op against a driver armed at point and expects it to die.
func (h *harness) crash(point string, op func(context.Context) error) {
	h.t.Helper()
	h.restart(point)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := op(ctx)
	select {
	case <-h.dead:
	case <-time.After(10 * time.Second):
		h.t.Fatalf("the driver did not die at %s (op returned %v)", point, err)
	}
	if status.Code(err) != codes.Unavailable {
		h.t.Fatalf("op at fault point %s returned %v, want Unavailable (the driver died)", point, err)
	}
	kills.Add(1)
	_ = h.c.Close()
	h.cmd = nil
	h.start("")
	h.checkScratchEmpty()
}

// ctx is the context of the CO's calls; go test -timeout bounds them.
func ctx() context.Context { return context.Background() }

// checkScratchEmpty checks that the restart removed every leftover.
func (h *harness) checkScratchEmpty() {
	h.t.Helper()
	for _, d := range []string{".tmp", ".trash"} {
		entries, err := os.ReadDir(filepath.Join(h.pool, d))
		if err != nil || len(entries) != 0 {
			h.t.Fatalf("%s after restart: %v %v", d, entries, err)
		}
	}
}

// checkEmptyAndClean checks the pool holds nothing and nothing leaked.
func (h *harness) checkEmptyAndClean() {
	h.t.Helper()
	lv, err := h.c.ListVolumes(ctx(), &csi.ListVolumesRequest{})
	if err != nil || len(lv.GetEntries()) != 0 {
		h.t.Fatalf("volumes left: %v %v", lv.GetEntries(), err)
	}
	ls, err := h.c.ListSnapshots(ctx(), &csi.ListSnapshotsRequest{})
	if err != nil || len(ls.GetEntries()) != 0 {
		h.t.Fatalf("snapshots left: %v %v", ls.GetEntries(), err)
	}
	loops, mounts, err := leakcheck.Leaks(h.dir)
	if err != nil || len(loops) != 0 || len(mounts) != 0 {
		h.t.Fatalf("leaked loop devices %v, mounts %v (%v)", loops, mounts, err)
	}
	if a := allocated(h.t, h.pool); a != h.base {
		h.t.Fatalf("pool allocates %d bytes, %d when empty", a, h.base)
	}
}

// allocated sums the blocks of every file in dir except the lock file.
func allocated(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		n += fi.Sys().(*syscall.Stat_t).Blocks * 512
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (h *harness) image(id string) string {
	return filepath.Join(pool.VolumeDir(h.pool, id), pool.ImageName)
}

func (h *harness) snapImage(id string) string {
	return filepath.Join(pool.SnapshotDir(h.pool, id), pool.ImageName)
}

func digest(t *testing.T, path string, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	sum := sha256.New()
	if _, err := io.CopyN(sum, f, n); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(sum.Sum(nil))
}

func mountCap() *csi.VolumeCapability { return csiclient.MountCap("ext4") }

func (h *harness) create(name string, n int64, src *csi.VolumeContentSource) (string, error) {
	r, err := h.c.CreateVolume(ctx(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: n},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, VolumeContentSource: src})
	return r.GetVolume().GetVolumeId(), err
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// withPattern creates a volume and writes a random pattern into its image.
func (h *harness) withPattern(name string) (string, string) {
	id, err := h.create(name, 16<<20, nil)
	mustOK(h.t, err)
	f, err := os.OpenFile(h.image(id), os.O_WRONLY, 0)
	mustOK(h.t, err)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 16<<20; off += 4 << 20 {
		for i := range buf {
			buf[i] = byte(rand.IntN(256))
		}
		_, err = f.WriteAt(buf, off)
		mustOK(h.t, err)
	}
	mustOK(h.t, f.Sync())
	mustOK(h.t, f.Close())
	return id, digest(h.t, h.image(id), 16<<20)
}

func TestKillDuringCreateAndDelete(t *testing.T) { onEachPool(t, killDuringCreateAndDelete) }

func killDuringCreateAndDelete(t *testing.T, h *harness) {
	for _, point := range []string{"create-image-written", "commit-meta-written", "create-renamed"} {
		h.crash(point, func(context.Context) error { _, err := h.create("v", 8<<20, nil); return err })
		// Either nothing or a whole volume exists; the retry answers it.
		lv, err := h.c.ListVolumes(ctx(), &csi.ListVolumesRequest{})
		mustOK(t, err)
		for _, e := range lv.GetEntries() {
			if fi, err := os.Stat(h.image(e.GetVolume().GetVolumeId())); err != nil || fi.Size() != 8<<20 {
				t.Fatalf("%s: a half-made volume survived: %v %v", point, fi, err)
			}
		}
		id, err := h.create("v", 8<<20, nil)
		mustOK(t, err)
		if len(lv.GetEntries()) == 1 && lv.GetEntries()[0].GetVolume().GetVolumeId() != id {
			t.Fatalf("%s: the retry made a second volume", point)
		}
		h.crash("delete-trashed", func(context.Context) error {
			_, err := h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		})
		_, err = h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: id})
		mustOK(t, err)
		h.checkEmptyAndClean()
	}
}

// The attach record is replaced atomically: a kill before the rename
// leaves the volume unattached, and the retry attaches it.
func TestKillDuringAttach(t *testing.T) { onEachPool(t, killDuringAttach) }

func killDuringAttach(t *testing.T, h *harness) {
	id, err := h.create("v", 8<<20, nil)
	mustOK(t, err)
	pub := &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: mountCap()}
	h.crash("meta-temp-written", func(context.Context) error { _, err := h.c.ControllerPublishVolume(ctx(), pub); return err })
	gv, err := h.c.ControllerGetVolume(ctx(), &csi.ControllerGetVolumeRequest{VolumeId: id})
	mustOK(t, err)
	if n := len(gv.GetStatus().GetPublishedNodeIds()); n != 0 {
		t.Fatalf("an attach interrupted before its record was renamed shows %d nodes", n)
	}
	if _, err := h.c.ControllerPublishVolume(ctx(), pub); err != nil {
		t.Fatal(err)
	}
	_, err = h.c.ControllerUnpublishVolume(ctx(), &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node})
	mustOK(t, err)
	_, err = h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: id})
	mustOK(t, err)
	h.checkEmptyAndClean()
}

// Snapshots, restores and clones interrupted at each step leave nothing or
// a whole copy, and the retried copy holds exactly the origin's data.
func TestKillDuringSnapshotRestoreClone(t *testing.T) { onEachPool(t, killDuringSnapshotRestoreClone) }

func killDuringSnapshotRestoreClone(t *testing.T, h *harness) {
	src, sum := h.withPattern("origin")
	var snapID string
	var snapIDs []string
	for _, point := range []string{"snapshot-copied", "commit-meta-written"} {
		h.crash(point, func(context.Context) error {
			_, err := h.c.CreateSnapshot(ctx(), &csi.CreateSnapshotRequest{Name: "snap-" + point, SourceVolumeId: src})
			return err
		})
		ls, err := h.c.ListSnapshots(ctx(), &csi.ListSnapshotsRequest{})
		mustOK(t, err)
		for _, e := range ls.GetEntries() {
			if digest(t, h.snapImage(e.GetSnapshot().GetSnapshotId()), 16<<20) != sum {
				t.Fatalf("%s: a snapshot that survived the kill does not hold the origin's data", point)
			}
		}
		s, err := h.c.CreateSnapshot(ctx(), &csi.CreateSnapshotRequest{Name: "snap-" + point, SourceVolumeId: src})
		mustOK(t, err)
		snapID = s.GetSnapshot().GetSnapshotId()
		snapIDs = append(snapIDs, snapID)
		if digest(t, h.snapImage(snapID), 16<<20) != sum {
			t.Fatalf("%s: the retried snapshot does not hold the origin's data", point)
		}
	}
	sources := map[string]*csi.VolumeContentSource{
		"restore": {Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}},
		"clone":   {Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}},
	}
	for name, cs := range sources {
		for _, point := range []string{"create-image-written", "commit-meta-written", "create-renamed"} {
			h.crash(point, func(context.Context) error { _, err := h.create(name, 32<<20, cs); return err })
			id, err := h.create(name, 32<<20, cs)
			mustOK(t, err)
			if digest(t, h.image(id), 16<<20) != sum {
				t.Fatalf("%s after a kill at %s does not hold the origin's data", name, point)
			}
			if fi, _ := os.Stat(h.image(id)); fi.Size() != 32<<20 {
				t.Fatalf("%s after a kill at %s is %d bytes, want 32 MiB", name, point, fi.Size())
			}
			_, err = h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: id})
			mustOK(t, err)
		}
	}
	for _, id := range snapIDs {
		_, err := h.c.DeleteSnapshot(ctx(), &csi.DeleteSnapshotRequest{SnapshotId: id})
		mustOK(t, err)
	}
	_, err := h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: src})
	mustOK(t, err)
	h.checkEmptyAndClean()
}

// An expansion interrupted between the image and its metadata is finished
// by the retry.
func TestKillDuringControllerExpand(t *testing.T) { onEachPool(t, killDuringControllerExpand) }

func killDuringControllerExpand(t *testing.T, h *harness) {
	id, sum := h.withPattern("v")
	exp := &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}}
	h.crash("expand-image-grown", func(context.Context) error { _, err := h.c.ControllerExpandVolume(ctx(), exp); return err })
	r, err := h.c.ControllerExpandVolume(ctx(), exp)
	mustOK(t, err)
	gv, err := h.c.ControllerGetVolume(ctx(), &csi.ControllerGetVolumeRequest{VolumeId: id})
	mustOK(t, err)
	if r.GetCapacityBytes() != 48<<20 || gv.GetVolume().GetCapacityBytes() != 48<<20 {
		t.Fatalf("after the retry: %d / %d bytes, want 48 MiB", r.GetCapacityBytes(), gv.GetVolume().GetCapacityBytes())
	}
	if digest(t, h.image(id), 16<<20) != sum {
		t.Fatal("the expansion changed the data")
	}
	_, err = h.c.DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: id})
	mustOK(t, err)
	h.checkEmptyAndClean()
}

// nodeVolume is a volume attached to the node for the node-side kills.
func (h *harness) nodeVolume(name string, vc *csi.VolumeCapability, n int64) *csiclient.Volume {
	h.t.Helper()
	v, err := h.c.Create(ctx(), name, n, vc, nil, node, h.dir)
	mustOK(h.t, err)
	return v
}

// The node steps killed half way: the restarted plugin and the CO's retry
// end in the state an uninterrupted call makes, the data written before
// the kill is there, and cleanup leaves nothing.
func TestKillDuringNodeOperations(t *testing.T) { onEachPool(t, killDuringNodeOperations) }

func killDuringNodeOperations(t *testing.T, h *harness) {
	data := []byte("written before the kill")
	points := []string{"stage-attached", "stage-mounted", "publish-target-made", "nodeexpand-capacity-set", "unstage-unmounted", "snapshot-frozen"}
	if h.shared {
		// On a shared pool, NodeStage first marks the attachment staged
		// on the share, under the volume's lock, then attaches: killed
		// between the two, the restarted plugin must neither trip over the
		// mark nor still hold the lock.
		points = append(points, "stage-marked")
	}
	for _, point := range points {
		vc, n := mountCap(), int64(32<<20)
		if point == "nodeexpand-capacity-set" {
			// xfs grows online without CAP_SYS_RESOURCE, which ext4 needs.
			vc, n = csiclient.MountCap("xfs"), 300<<20
		}
		v := h.nodeVolume("n-"+point, vc, n)
		stage := func(context.Context) error {
			_, err := h.c.NodeStageVolume(ctx(), &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: v.PublishContext})
			return err
		}
		publish := func(context.Context) error {
			_, err := h.c.NodePublishVolume(ctx(), &csi.NodePublishVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: v.Target, VolumeCapability: v.Cap, PublishContext: v.PublishContext})
			return err
		}
		switch point {
		case "stage-marked", "stage-attached", "stage-mounted":
			h.crash(point, stage)
			mustOK(t, stage(ctx()))
			mustOK(t, publish(ctx()))
			mustOK(t, csiclient.WriteFile(filepath.Join(v.Target, "data"), data))
		case "publish-target-made":
			mustOK(t, stage(ctx()))
			h.crash(point, publish)
			mustOK(t, publish(ctx()))
			mustOK(t, csiclient.WriteFile(filepath.Join(v.Target, "data"), data))
		case "nodeexpand-capacity-set":
			mustOK(t, h.c.StageAndPublish(ctx(), v))
			mustOK(t, csiclient.WriteFile(filepath.Join(v.Target, "data"), data))
			_, err := h.c.ControllerExpandVolume(ctx(), &csi.ControllerExpandVolumeRequest{VolumeId: v.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20}})
			mustOK(t, err)
			exp := func(context.Context) error {
				_, err := h.c.NodeExpandVolume(ctx(), &csi.NodeExpandVolumeRequest{VolumeId: v.ID, VolumePath: v.Target})
				return err
			}
			h.crash(point, exp)
			mustOK(t, exp(ctx()))
		case "snapshot-frozen":
			mustOK(t, h.c.StageAndPublish(ctx(), v))
			snap := &csi.CreateSnapshotRequest{Name: "frozen", SourceVolumeId: v.ID}
			h.crash(point, func(context.Context) error { _, err := h.c.CreateSnapshot(ctx(), snap); return err })
			// The kernel kept the filesystem frozen after the driver died;
			// the restart must have thawed it, or this write hangs.
			wrote := make(chan error, 1)
			go func() { wrote <- csiclient.WriteFile(filepath.Join(v.Target, "data"), data) }()
			select {
			case err := <-wrote:
				mustOK(t, err)
			case <-time.After(10 * time.Second):
				t.Fatal("the filesystem is still frozen after the driver restarted")
			}
			s, err := h.c.CreateSnapshot(ctx(), snap)
			mustOK(t, err)
			_, err = h.c.DeleteSnapshot(ctx(), &csi.DeleteSnapshotRequest{SnapshotId: s.GetSnapshot().GetSnapshotId()})
			mustOK(t, err)
		case "unstage-unmounted":
			mustOK(t, h.c.StageAndPublish(ctx(), v))
			mustOK(t, csiclient.WriteFile(filepath.Join(v.Target, "data"), data))
			_, err := h.c.NodeUnpublishVolume(ctx(), &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: v.Target})
			mustOK(t, err)
			h.crash(point, func(context.Context) error {
				_, err := h.c.NodeUnstageVolume(ctx(), &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging})
				return err
			})
			mustOK(t, h.c.StageAndPublish(ctx(), v))
		}
		if got, err := os.ReadFile(filepath.Join(v.Target, "data")); err != nil || string(got) != string(data) {
			t.Fatalf("%s: data after the kill and retry: %q %v", point, got, err)
		}
		mustOK(t, h.c.UnpublishAndUnstage(ctx(), v))
		mustOK(t, h.c.Delete(ctx(), v, node))
	}
	h.checkEmptyAndClean()
}

// workload is what a CO does with one volume, in order. After a kill the
// CO repeats the call that got no answer (every call is idempotent) and
// goes on with the rest.
func (h *harness) workload(i int) []func() error {
	name := fmt.Sprintf("w%d", i)
	v := &csiclient.Volume{Cap: mountCap(), Staging: filepath.Join(h.dir, name+"-staging"), Target: filepath.Join(h.dir, name+"-target")}
	if i%3 == 0 {
		v.Cap = csiclient.BlockCap()
	}
	var snapID, restoreID string
	c := func() *csiclient.Client { return h.c }
	return []func() error{
		func() error {
			r, err := c().CreateVolume(ctx(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{v.Cap}})
			v.ID = r.GetVolume().GetVolumeId()
			return err
		},
		func() error {
			r, err := c().ControllerPublishVolume(ctx(), &csi.ControllerPublishVolumeRequest{VolumeId: v.ID, NodeId: node, VolumeCapability: v.Cap})
			v.PublishContext = r.GetPublishContext()
			return err
		},
		func() error { return c().StageAndPublish(ctx(), v) },
		func() error {
			r, err := c().CreateSnapshot(ctx(), &csi.CreateSnapshotRequest{Name: name + "-snap", SourceVolumeId: v.ID})
			snapID = r.GetSnapshot().GetSnapshotId()
			return err
		},
		func() error {
			r, err := c().CreateVolume(ctx(), &csi.CreateVolumeRequest{Name: name + "-restore", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{v.Cap},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}})
			restoreID = r.GetVolume().GetVolumeId()
			return err
		},
		func() error {
			_, err := c().ControllerExpandVolume(ctx(), &csi.ControllerExpandVolumeRequest{VolumeId: v.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: 24 << 20}})
			return err
		},
		func() error { return c().UnpublishAndUnstage(ctx(), v) },
		func() error { return c().Delete(ctx(), v, node) },
		func() error {
			_, err := c().DeleteVolume(ctx(), &csi.DeleteVolumeRequest{VolumeId: restoreID})
			return err
		},
		func() error {
			_, err := c().DeleteSnapshot(ctx(), &csi.DeleteSnapshotRequest{SnapshotId: snapID})
			return err
		},
	}
}

// Kills at random moments of a CO's workload: after a restart the CO
// retries the interrupted call and finishes the workload, which must
// succeed and leave nothing behind.
func TestRandomKills(t *testing.T) { onEachPool(t, randomKills) }

func randomKills(t *testing.T, h *harness) {
	n := 200
	if testing.Short() {
		n = 20
	}
	interruptedAt := map[int]int{}
	defer func() {
		t.Logf("kills by the workload step they interrupted (%d = after the last): %v", len(h.workload(0)), interruptedAt)
	}()
	for i := range n {
		steps := h.workload(i)
		done := make(chan int, 1)
		go func() {
			k := 0
			for ; k < len(steps); k++ {
				if steps[k]() != nil {
					break
				}
			}
			done <- k
		}()
		time.Sleep(time.Duration(rand.IntN(100)) * time.Millisecond)
		h.kill()
		interrupted := <-done
		interruptedAt[interrupted]++
		h.restart("")
		h.checkScratchEmpty()
		// The CO repeats the call that did not answer, then goes on.
		for k := interrupted; k < len(steps); k++ {
			if err := steps[k](); err != nil {
				t.Fatalf("iteration %d: step %d failed after a kill during step %d: %v (log: %s)", i, k, interrupted, err, filepath.Join(h.dir, "spool.log"))
			}
		}
		h.checkEmptyAndClean()
	}
}
