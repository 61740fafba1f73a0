//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// Scenario 1: dynamic provisioning with Immediate binding. The PV carries the
// handle, capacity and node affinity; data written by one pod is read back
// by the next.
func TestDynamicProvisioningImmediate(t *testing.T) {
	independent(t)
	ns := namespace(t)
	class := "spool-e2e-immediate-" + ns
	storageClass(t, class, "Immediate")

	t0 := time.Now()
	apply(t, pvc(ns, pvcSpec{name: "data", class: class, size: "100Mi"}))
	waitJSONPath(t, ns, "pvc/data", ".status.phase", "Bound")
	bound := time.Since(t0)

	_, pv := boundPV(t, ns, "data")
	if pv.Spec.CSI.Driver != "spool.csi.dev" {
		t.Errorf("PV driver %q", pv.Spec.CSI.Driver)
	}
	prefix, key, value := volumeTopology()
	if !strings.HasPrefix(pv.Spec.CSI.VolumeHandle, prefix) {
		t.Errorf("volume handle %q does not start with %q", pv.Spec.CSI.VolumeHandle, prefix)
	}
	if pv.Spec.Capacity.Storage != "100Mi" {
		t.Errorf("PV capacity %q, want 100Mi", pv.Spec.Capacity.Storage)
	}
	terms := pv.Spec.NodeAffinity.Required.Terms
	if len(terms) != 1 || len(terms[0].Exprs) != 1 || terms[0].Exprs[0].Key != key ||
		strings.Join(terms[0].Exprs[0].Values, ",") != value {
		t.Errorf("PV node affinity %+v, want %s in [%s]", terms, key, value)
	}
	img := imagePath(t, pv.Spec.CSI.VolumeHandle)
	if st, err := statSize(img); err != nil || st != 100<<20 {
		t.Errorf("image %s: size %d, %v; want %d", img, st, err, 100<<20)
	}

	// A long-running writer, to time PVC creation to pod Running.
	apply(t, pod(ns, "writer", "data", writeScript("/data/file", 8)+"; sleep 3600", false, false))
	waitJSONPath(t, ns, "pod/writer", ".status.phase", "Running")
	running := time.Since(t0)
	t.Logf("scenario 1: PVC Bound %.1fs after creation, writer pod Running after %.1fs", bound.Seconds(), running.Seconds())
	var sum string
	eventually(t, "writer's checksum", time.Minute, func() error {
		logs := kubectl(t, "logs", "writer", "-n", ns)
		if len(strings.TrimSpace(logs)) != 64 {
			return fmt.Errorf("log %q", logs)
		}
		sum = strings.TrimSpace(logs)
		return nil
	})
	kubectl(t, "delete", "pod", "writer", "-n", ns, "--wait")
	if got := checksum(t, runPod(t, ns, "reader", "data", readScript("/data/file"), false, false)); got != sum {
		t.Fatalf("second pod read checksum %s, first wrote %s", got, sum)
	}
}

// Scenario 2: WaitForFirstConsumer with topology and storage capacity
// tracking. The provisioner runs with --node-deployment --enable-capacity:
// the CSIStorageCapacity object of the node follows the pool, and a claim
// larger than the pool keeps its pod Pending with a clear event.
func TestCapacityTracking(t *testing.T) {
	if env.spool == nil {
		t.Skip("needs Spool as a host process (make e2e), not deploy/" + *flavour)
	}
	ns := namespace(t)
	const class = "spool-ext4"
	capacityOf := func() (int64, error) {
		out, err := env.c.Kubectl(ctxFor(t), "get", "csistoragecapacities", "-n", "spool-system", "-o",
			`jsonpath={range .items[?(@.storageClassName=="`+class+`")]}{.nodeTopology.matchLabels.spool\.csi\.dev/node}={.capacity}{"\n"}{end}`)
		if err != nil {
			return 0, err
		}
		for _, l := range strings.Split(out, "\n") {
			if node, q, ok := strings.Cut(l, "="); ok && node == env.c.NodeName {
				return parseQuantity(q)
			}
		}
		return 0, fmt.Errorf("no CSIStorageCapacity for class %s on node %s in %q", class, env.c.NodeName, out)
	}
	// The object must say what the pool has left: its capacity minus what
	// its volumes reserve.
	expectFree := func(t *testing.T) {
		t.Helper()
		eventually(t, "CSIStorageCapacity equals the pool's free space", time.Minute, func() error {
			got, err := capacityOf()
			if err != nil {
				return err
			}
			want, err := poolFree()
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("CSIStorageCapacity %d, pool free %d", got, want)
			}
			return nil
		})
	}
	expectFree(t)
	before, _ := capacityOf()

	apply(t, pvc(ns, pvcSpec{name: "small", class: class, size: "512Mi"}))
	time.Sleep(2 * time.Second)
	if phase := kubectl(t, "get", "pvc", "small", "-n", ns, "-o", "jsonpath={.status.phase}"); phase != "Pending" {
		t.Fatalf("WaitForFirstConsumer claim is %s before any pod uses it", phase)
	}
	runPod(t, ns, "user", "small", "echo ok", false, false)
	waitJSONPath(t, ns, "pvc/small", ".status.phase", "Bound")
	expectFree(t)
	if after, _ := capacityOf(); before-after != 512<<20 {
		t.Errorf("capacity went from %d to %d after a 512Mi volume; want a drop of %d", before, after, 512<<20)
	}

	apply(t, pvc(ns, pvcSpec{name: "huge", class: class, size: "100Gi"}))
	apply(t, pod(ns, "huge-user", "huge", "echo never", false, false))
	eventually(t, "scheduling event about storage capacity", time.Minute, func() error {
		ev := kubectl(t, "get", "events", "-n", ns, "--field-selector", "involvedObject.name=huge-user", "-o", "jsonpath={.items[*].message}")
		if !strings.Contains(ev, "enough free storage") {
			return fmt.Errorf("events of huge-user: %q", ev)
		}
		return nil
	})
	if phase := kubectl(t, "get", "pvc", "huge", "-n", ns, "-o", "jsonpath={.status.phase}"); phase != "Pending" {
		t.Errorf("claim larger than the pool is %s, want Pending", phase)
	}
	if phase := kubectl(t, "get", "pod", "huge-user", "-n", ns, "-o", "jsonpath={.status.phase}"); phase != "Pending" {
		t.Errorf("pod of a claim larger than the pool is %s, want Pending", phase)
	}
}
