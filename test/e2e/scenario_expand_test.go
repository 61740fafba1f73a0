//go:build e2e

package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Scenario 7: expansion through the external-resizer. Online: an xfs claim in
// use by a pod grows and the pod sees the larger filesystem without a
// restart. Offline: an ext4 claim grows while no pod uses it and the next pod
// sees it. (Online ext4 growth needs CAP_SYS_RESOURCE, which this VM's root
// lacks; see docs/volumes.md.)
func TestExpansion(t *testing.T) {
	independent(t)
	t.Run("online xfs", func(t *testing.T) {
		independent(t)
		ns := namespace(t)
		apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-xfs", size: "300Mi"}))
		apply(t, pod(ns, "watcher", "data",
			writeScript("/data/file", 4)+"; while true; do echo size=$(df -k /data | tail -n 1 | awk '{print $2}'); sleep 1; done", false, false))
		waitJSONPath(t, ns, "pod/watcher", ".status.phase", "Running")
		uid := kubectl(t, "get", "pod", "watcher", "-n", ns, "-o", "jsonpath={.metadata.uid}")
		before := lastSize(t, ns, "watcher")

		kubectl(t, "patch", "pvc", "data", "-n", ns, "--type=merge", "-p", `{"spec":{"resources":{"requests":{"storage":"400Mi"}}}}`)
		waitJSONPath(t, ns, "pvc/data", ".status.capacity.storage", "400Mi")
		eventually(t, "the pod sees the larger filesystem", 2*time.Minute, func() error {
			if now := lastSize(t, ns, "watcher"); now < before+90*1024 {
				return fmt.Errorf("df says %d KiB, was %d KiB before", now, before)
			}
			return nil
		})
		if got := kubectl(t, "get", "pod", "watcher", "-n", ns, "-o", "jsonpath={.metadata.uid}/{.status.containerStatuses[0].restartCount}"); got != uid+"/0" {
			t.Errorf("the pod was restarted or replaced: %s, want %s/0", got, uid)
		}
		_, pv := boundPV(t, ns, "data")
		if n, err := statSize(imagePath(t, pv.Spec.CSI.VolumeHandle)); err != nil || n != 400<<20 {
			t.Errorf("image size %d, %v; want %d", n, err, 400<<20)
		}
	})

	t.Run("offline ext4", func(t *testing.T) {
		independent(t)
		ns := namespace(t)
		apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-ext4", size: "64Mi"}))
		sum := checksum(t, runPod(t, ns, "writer", "data", writeScript("/data/file", 4), false, false))
		kubectl(t, "patch", "pvc", "data", "-n", ns, "--type=merge", "-p", `{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}`)
		pvName, _ := boundPV(t, ns, "data")
		waitJSONPath(t, "", "pv/"+pvName, ".spec.capacity.storage", "128Mi")
		out := runPod(t, ns, "reader", "data", "echo size=$(df -k /data | tail -n 1 | awk '{print $2}'); "+readScript("/data/file"), false, false)
		if got := checksum(t, out); got != sum {
			t.Errorf("read %s after growth, wrote %s", got, sum)
		}
		if n := sizeIn(out); n < 100*1024 {
			t.Errorf("filesystem is %d KiB after growing to 128Mi: %q", n, out)
		}
		waitJSONPath(t, ns, "pvc/data", ".status.capacity.storage", "128Mi")
	})
}

// lastSize is the last "size=N" (KiB) line of the pod's log.
func lastSize(t *testing.T, ns, pod string) int64 {
	t.Helper()
	var n int64
	eventually(t, "a size line in "+pod+"'s log", time.Minute, func() error {
		n = sizeIn(kubectl(t, "logs", pod, "-n", ns))
		if n == 0 {
			return fmt.Errorf("no size line yet")
		}
		return nil
	})
	return n
}

func sizeIn(log string) int64 {
	var n int64
	for _, l := range strings.Split(log, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "size="); ok {
			n, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	return n
}
