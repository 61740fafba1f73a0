//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/nodens"
)

// Scenario 11: a volume of a shared pool moves between nodes and keeps its
// data. The cluster has one real node; the harness plays the second one,
// vm-2: a spool node plugin in its own mount namespace with a CSINode object
// of its own, for which the test creates VolumeAttachments as the
// attach/detach controller would, and whose kubelet calls (stage, publish)
// it makes itself. The real csi-attacher attaches and detaches; the writes
// and reads happen in pods on the real node and in vm-2's namespace.
func TestSharedPoolMove(t *testing.T) {
	independent(t)
	if *flavour != "" {
		t.Skip("needs Spool as a host process (make e2e), not deploy/" + *flavour)
	}
	ctx := ctxFor(t)
	ns := namespace(t)
	const node2 = "vm-2"
	vm2 := startNode2(t, node2)

	apply(t, `apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: spool-e2e-shared}
provisioner: spool.csi.dev
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
parameters: {csi.storage.k8s.io/fstype: ext4, pool: shared}
`)
	t.Cleanup(func() { kubectl(t, "delete", "storageclass", "spool-e2e-shared") })
	apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-e2e-shared", size: "64Mi"}))
	apply(t, pod(ns, "writer", "data", writeScript("/data/blob", 8)+"; sleep 3600", false, false))
	waitJSONPath(t, ns, "pod/writer", ".status.phase", "Running")
	var sum string
	eventually(t, "the writer's checksum", time.Minute, func() error {
		for _, l := range strings.Fields(kubectl(t, "logs", "writer", "-n", ns)) {
			if len(l) == 64 {
				sum = l
				return nil
			}
		}
		return fmt.Errorf("not written yet")
	})
	pvName, pv := boundPV(t, ns, "data")
	handle := pv.Spec.CSI.VolumeHandle
	if !strings.HasPrefix(handle, "shared::") {
		t.Fatalf("volume handle %q is not a shared pool's", handle)
	}
	if terms := pv.Spec.NodeAffinity.Required.Terms; len(terms) != 1 || len(terms[0].Exprs) != 1 ||
		terms[0].Exprs[0].Key != "spool.csi.dev/pool-shared" || strings.Join(terms[0].Exprs[0].Values, ",") != "present" {
		t.Fatalf("PV node affinity %+v, want spool.csi.dev/pool-shared=present", terms)
	}

	// The fence, through the real attacher: vm-2 cannot have the volume
	// while the writer's node holds it.
	va := "spool-e2e-" + ns + "-" + node2
	apply(t, volumeAttachment(va, node2, pvName))
	eventually(t, "attach to "+node2+" refused", time.Minute, func() error {
		msg := kubectl(t, "get", "volumeattachment", va, "-o", "jsonpath={.status.attachError.message}")
		if !strings.Contains(msg, "attached to node "+env.c.NodeName) {
			return fmt.Errorf("attach error %q", msg)
		}
		return nil
	})
	if got := kubectl(t, "get", "volumeattachment", va, "-o", "jsonpath={.status.attached}"); got == "true" {
		t.Fatal("the volume was attached to a second node")
	}
	deleteAttachment(t, va)

	// The move: the pod goes, the volume detaches, vm-2 attaches and stages.
	t0 := time.Now()
	kubectl(t, "delete", "pod", "writer", "-n", ns, "--wait")
	eventually(t, "detached from "+env.c.NodeName, 2*time.Minute, func() error {
		if a := attachmentOf(t, pvName); a != "" {
			return fmt.Errorf("VolumeAttachment %s still exists", a)
		}
		return nil
	})
	t1 := time.Now()
	apply(t, volumeAttachment(va, node2, pvName))
	waitJSONPath(t, "", "volumeattachment/"+va, ".status.attached", "true")
	var pc map[string]string
	if err := json.Unmarshal([]byte(kubectl(t, "get", "volumeattachment", va, "-o", "jsonpath={.status.attachmentMetadata}")), &pc); err != nil {
		t.Fatalf("attachment metadata: %v", err)
	}
	dir := t.TempDir()
	v := &csiclient.Volume{ID: handle, Cap: csiclient.MountCap("ext4"), PublishContext: pc,
		Staging: filepath.Join(dir, "staging"), Target: filepath.Join(dir, "target")}
	if err := vm2.StageAndPublish(ctx, v); err != nil {
		t.Fatal(err)
	}
	t2 := time.Now()
	t.Logf("moved the volume from %s to %s in %v: detach (pod deleted, VolumeAttachment gone) %v, attach and stage %v",
		env.c.NodeName, node2, t2.Sub(t0).Round(10*time.Millisecond), t1.Sub(t0).Round(10*time.Millisecond), t2.Sub(t1).Round(10*time.Millisecond))
	if got := vm2.sh(t, "sha256sum "+v.Target+"/blob | cut -d' ' -f1"); got != sum {
		t.Fatalf("%s reads %s, the writer wrote %s", node2, got, sum)
	}
	// What vm-2 writes, the real node reads after the volume moves back.
	sum2 := vm2.sh(t, "dd if=/dev/urandom of="+v.Target+"/blob2 bs=1M count=4 conv=fsync status=none; sha256sum "+v.Target+"/blob2 | cut -d' ' -f1")
	if err := vm2.UnpublishAndUnstage(ctx, v); err != nil {
		t.Fatal(err)
	}
	deleteAttachment(t, va)
	log := runPod(t, ns, "reader", "data", readScript("/data/blob")+"; "+readScript("/data/blob2"), false, false)
	if got := strings.Fields(log); len(got) != 2 || got[0] != sum || got[1] != sum2 {
		t.Fatalf("back on %s the reader sees %q, want [%s %s]", env.c.NodeName, got, sum, sum2)
	}
	kubectl(t, "delete", "pvc", "data", "-n", ns, "--wait")
	eventually(t, "PV "+pvName+" deleted", 2*time.Minute, func() error {
		if out, _ := env.c.Kubectl(context.Background(), "get", "pv", pvName, "--ignore-not-found", "-o", "name"); out != "" {
			return fmt.Errorf("%s still exists", out)
		}
		return nil
	})
}

func volumeAttachment(name, node, pv string) string {
	return fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: VolumeAttachment
metadata: {name: %s}
spec:
  attacher: spool.csi.dev
  nodeName: %s
  source: {persistentVolumeName: %s}
`, name, node, pv)
}

// deleteAttachment deletes a VolumeAttachment and waits until the attacher
// has detached it (its finalizer gone).
func deleteAttachment(t *testing.T, name string) {
	t.Helper()
	kubectl(t, "delete", "volumeattachment", name, "--wait=false")
	eventually(t, "VolumeAttachment "+name+" deleted", 2*time.Minute, func() error {
		if out, _ := env.c.Kubectl(context.Background(), "get", "volumeattachment", name, "--ignore-not-found", "-o", "name"); out != "" {
			return fmt.Errorf("%s still exists", out)
		}
		return nil
	})
}

// node2 is the second node's spool node plugin.
type node2 struct {
	*csiclient.Client
	pid int
}

// startNode2 runs spool --mode=node for the shared pool as node name, in a
// mount namespace of its own, and registers it with a CSINode object.
func startNode2(t *testing.T, name string) *node2 {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	logf, err := os.Create(filepath.Join(dir, "spool.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := nodens.Command(env.spoolBin,
		"--endpoint=unix://"+sock, "--node-id="+name, "--mode=node", "--pool=shared="+env.sharedDir+",shared", "--v=4")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("%s's spool log:\n%s", name, b)
		}
	})
	c, err := csiclient.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	eventually(t, name+"'s spool serving", 30*time.Second, func() error {
		_, err := c.Probe(context.Background(), &csi.ProbeRequest{})
		return err
	})
	// The CSINode object kubelet would make from NodeGetInfo.
	info, err := c.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	keys := slices.Sorted(maps.Keys(info.GetAccessibleTopology().GetSegments()))
	if !slices.Equal(keys, []string{"spool.csi.dev/pool-shared"}) {
		t.Fatalf("%s (only a shared pool) reports topology keys %v", name, keys)
	}
	apply(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: %s}
spec:
  drivers:
  - name: spool.csi.dev
    nodeID: %s
    topologyKeys: [%s]
`, name, info.GetNodeId(), strings.Join(keys, ", ")))
	t.Cleanup(func() { kubectl(t, "delete", "csinode", name, "--ignore-not-found") })
	return &node2{Client: c, pid: cmd.Process.Pid}
}

// sh runs a shell script in the node's mount namespace.
func (n *node2) sh(t *testing.T, script string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--mount", "--target", fmt.Sprint(n.pid), "--", "sh", "-ec", script).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
	return strings.TrimSpace(string(out))
}
