// Package shared tests shared pools across "nodes" on one machine, with the
// real kernel: two node plugins (the spool binary, --mode=node, different
// node IDs), each in its own mount namespace (unshare --mount), and two
// controller processes, all serving one shared pool directory. Data is
// written and read inside each node's namespace (nsenter).
//
// Loop devices are not namespaced: on one machine, every node plugin sees
// the others' devices. The tests therefore start every process before they
// stage anything (a starting node plugin detaches loop devices its own
// namespace does not use), and never stage one volume on two nodes at once.
package shared

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
	"github.com/spool-csi/spool/test/nodens"
)

var spoolBin string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("shared pool tests need root (loop devices, mounts, namespaces): skipped")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "spool-shared-bin.")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	spoolBin = filepath.Join(dir, "spool")
	build := exec.Command("go", "build", "-o", spoolBin, "github.com/spool-csi/spool/cmd/spool")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building spool:", err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one spool process and a client of its socket.
type proc struct {
	*csiclient.Client
	name string
	pid  int
}

// start runs spool with a shared pool, in a mount namespace of its own when
// node is set, and stops it when the test ends.
func start(t *testing.T, dir, share, name, mode, nodeID string) *proc {
	t.Helper()
	sock := filepath.Join(dir, name+".sock")
	args := []string{"--endpoint", "unix://" + sock, "--node-id", nodeID, "--mode", mode,
		"--pool", "nfs=" + share + ",shared", "-v", "4"}
	cmd := exec.Command(spoolBin, args...)
	if mode == "node" {
		cmd = nodens.Command(spoolBin, args...)
	}
	logf, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("%s did not stop on SIGTERM", name)
		}
		logf.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logf.Name()); err == nil {
				t.Logf("%s log (tail):\n%s", name, tail(string(b), 30))
			}
		}
	})
	c, err := csiclient.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("%s exited: %v", name, err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is not serving: %v", name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return &proc{Client: c, name: name, pid: cmd.Process.Pid}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// sh runs a shell script in the node's mount namespace.
func (p *proc) sh(t *testing.T, script string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--mount", "--target", fmt.Sprint(p.pid), "--", "sh", "-ec", script).CombinedOutput()
	if err != nil {
		t.Fatalf("on %s: %s: %v\n%s", p.name, script, err, out)
	}
	return strings.TrimSpace(string(out))
}

func publish(ctx context.Context, c *proc, id, node string, vc *csi.VolumeCapability) (map[string]string, error) {
	r, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: vc})
	return r.GetPublishContext(), err
}

func unpublish(t *testing.T, ctx context.Context, c *proc, id, node string) {
	t.Helper()
	if _, err := c.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node}); err != nil {
		t.Fatal(err)
	}
}

// loopsOf counts the loop devices backed by images under share.
func loopsOf(t *testing.T, share string) int {
	t.Helper()
	loops, _, err := leakcheck.Leaks(share)
	if err != nil {
		t.Fatal(err)
	}
	return len(loops)
}

// stagedOnA creates a volume, attaches it to node-a and stages and
// publishes it there.
func (c *cluster) stagedOnA(t *testing.T, ctx context.Context, name string, n int64, vc *csi.VolumeCapability) *csiclient.Volume {
	t.Helper()
	r, err := c.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: n},
		VolumeCapabilities: []*csi.VolumeCapability{vc}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	pc, err := publish(ctx, c.ctrl, id, "node-a", vc)
	if err != nil {
		t.Fatal(err)
	}
	v := &csiclient.Volume{ID: id, Cap: vc, PublishContext: pc, Staging: filepath.Join(c.dir, "a-staging"), Target: filepath.Join(c.dir, "a-target")}
	if err := c.nodeA.StageAndPublish(ctx, v); err != nil {
		t.Fatal(err)
	}
	return v
}

type cluster struct {
	share        string
	dir          string
	ctrl, ctrl2  *proc
	nodeA, nodeB *proc
}

func newCluster(t *testing.T) *cluster {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	share := filepath.Join(dir, "share")
	if _, err := pool.Init("nfs", share); err != nil {
		t.Fatal(err)
	}
	c := &cluster{share: share, dir: dir}
	c.ctrl = start(t, dir, share, "controller-1", "controller", "controller-1")
	c.ctrl2 = start(t, dir, share, "controller-2", "controller", "controller-2")
	c.nodeA = start(t, dir, share, "node-a", "node", "node-a")
	c.nodeB = start(t, dir, share, "node-b", "node", "node-b")
	return c
}

// TestMoveBetweenNodes writes data on node-a, moves the volume to node-b
// the way Kubernetes does, and reads it back there; node-b can neither be
// attached nor stage while node-a holds the volume.
func TestMoveBetweenNodes(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	vc := csiclient.MountCap("ext4")
	onA := c.stagedOnA(t, ctx, "move", 1<<30, vc)
	id, pcA := onA.ID, onA.PublishContext
	sum := c.nodeA.sh(t, "dd if=/dev/urandom of="+onA.Target+"/data bs=1M count=16 conv=fsync status=none; sha256sum "+onA.Target+"/data | cut -d' ' -f1")
	if _, err := os.Stat(filepath.Join(onA.Target, "data")); !os.IsNotExist(err) {
		t.Fatalf("node-a's mount is visible outside its namespace: %v", err)
	}

	// node-b: not while node-a holds it.
	if _, err := publish(ctx, c.ctrl, id, "node-b", vc); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("attach to node-b while attached to node-a: %v", err)
	}
	onB := &csiclient.Volume{ID: id, Cap: vc, Staging: filepath.Join(c.dir, "b-staging"), Target: filepath.Join(c.dir, "b-target")}
	forged := map[string]string{"spool.csi.dev/node": "node-b", "spool.csi.dev/generation": pcA["spool.csi.dev/generation"], "spool.csi.dev/pool-id": pcA["spool.csi.dev/pool-id"]}
	for name, pc := range map[string]map[string]string{"node-a's": pcA, "forged": forged} {
		_, err := c.nodeB.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: onB.Staging, VolumeCapability: vc, PublishContext: pc})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("stage on node-b with %s publish context: %v", name, err)
		}
	}
	if n := loopsOf(t, c.share); n != 1 {
		t.Fatalf("%d loop devices after node-b's refused stage, want node-a's 1", n)
	}

	// The move, as the kubelet and the attacher make it.
	t0 := time.Now()
	if err := c.nodeA.UnpublishAndUnstage(ctx, onA); err != nil {
		t.Fatal(err)
	}
	unpublish(t, ctx, c.ctrl, id, "node-a")
	t1 := time.Now()
	var err error
	if onB.PublishContext, err = publish(ctx, c.ctrl, id, "node-b", vc); err != nil {
		t.Fatal(err)
	}
	if err := c.nodeB.StageAndPublish(ctx, onB); err != nil {
		t.Fatal(err)
	}
	t.Logf("moved a 1 GiB ext4 volume from node-a to node-b in %v (detach %v, attach and stage %v)",
		time.Since(t0).Round(time.Millisecond), t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
	if got := c.nodeB.sh(t, "sha256sum "+onB.Target+"/data | cut -d' ' -f1"); got != sum {
		t.Fatalf("node-b reads %s, node-a wrote %s", got, sum)
	}
	if err := c.nodeB.UnpublishAndUnstage(ctx, onB); err != nil {
		t.Fatal(err)
	}
	unpublish(t, ctx, c.ctrl, id, "node-b")
	if _, err := c.ctrl2.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if n := loopsOf(t, c.share); n != 0 {
		t.Fatalf("%d loop devices left", n)
	}
}

// TestRacingControllers publishes each volume to node-a and node-b at once
// from two controller processes: exactly one wins every time.
func TestRacingControllers(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	vc := csiclient.MountCap("ext4")
	for i := range 10 {
		r, err := c.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("race-%d", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{vc}})
		if err != nil {
			t.Fatal(err)
		}
		id := r.GetVolume().GetVolumeId()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j, ctrl := range []*proc{c.ctrl, c.ctrl2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[j] = publish(ctx, ctrl, id, []string{"node-a", "node-b"}[j], vc)
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch status.Code(err) {
			case codes.OK:
				won++
			case codes.FailedPrecondition, codes.Aborted:
			default:
				t.Fatalf("race %d: %v", i, err)
			}
		}
		v, err := c.ctrl2.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		nodes := v.GetStatus().GetPublishedNodeIds()
		if won != 1 || len(nodes) != 1 {
			t.Fatalf("race %d: %d publishes won, volume attached to %v: want exactly one", i, won, nodes)
		}
		unpublish(t, ctx, c.ctrl, id, nodes[0])
		if _, err := c.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestForceDetach detaches node-a without unstaging (node-a is "gone"),
// attaches node-b, and checks that node-a's plugin knows it lost the volume
// and cannot stage it again.
func TestForceDetach(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	vc := csiclient.BlockCap()
	onA := c.stagedOnA(t, ctx, "fence", 64<<20, vc)
	id, pcA := onA.ID, onA.PublishContext
	health := func() []*csi.VolumeHealth_VolumeHealthEntry {
		h, err := c.nodeA.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: onA.Staging})
		if err != nil {
			t.Fatal(err)
		}
		return h.GetVolumeHealth().GetHealthStatuses()
	}
	if h := health(); len(h) != 0 {
		t.Fatalf("node-a health while attached: %v", h)
	}
	unpublish(t, ctx, c.ctrl, id, "node-a") // the force detach
	if _, err := publish(ctx, c.ctrl2, id, "node-b", vc); err != nil {
		t.Fatal(err)
	}
	lost := false
	for _, e := range health() {
		lost = lost || e.GetReason() == "AttachmentLost"
	}
	if !lost {
		t.Fatalf("node-a does not report the lost attachment: %v", health())
	}
	_, err := c.nodeA.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(c.dir, "a-staging-2"), VolumeCapability: vc, PublishContext: pcA})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("node-a stages again after the force detach: %v", err)
	}
	// node-a cleans up what it still holds; the volume stays node-b's.
	if err := c.nodeA.UnpublishAndUnstage(ctx, onA); err != nil {
		t.Fatal(err)
	}
	if n := loopsOf(t, c.share); n != 0 {
		t.Fatalf("%d loop devices left", n)
	}
	unpublish(t, ctx, c.ctrl, id, "node-b")
	if _, err := c.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}
