//go:build e2e

package e2e

import (
	"testing"
)

// Scenario 8: a VolumeSnapshot through the snapshotter, a claim restored from
// it and a claim cloned from a claim, checked byte for byte.
func TestSnapshotRestoreClone(t *testing.T) {
	independent(t)
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "src", class: "spool-ext4", size: "64Mi"}))
	sum := checksum(t, runPod(t, ns, "writer", "src", writeScript("/data/file", 8), false, false))

	snapshotClaim(t, ns, "snap", "src")
	// The source changes after the snapshot: the restore must not see it.
	runPod(t, ns, "overwrite", "src", "echo changed > /data/file; sync", false, false)

	apply(t, pvc(ns, pvcSpec{name: "restored", class: "spool-ext4", size: "64Mi",
		dataSource: "    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: snap\n"}))
	if got := checksum(t, runPod(t, ns, "restore-reader", "restored", readScript("/data/file"), false, false)); got != sum {
		t.Errorf("restored volume holds %s, snapshot was taken of %s", got, sum)
	}

	apply(t, pvc(ns, pvcSpec{name: "clone", class: "spool-ext4", size: "64Mi",
		dataSource: "    kind: PersistentVolumeClaim\n    name: restored\n"}))
	if got := checksum(t, runPod(t, ns, "clone-reader", "clone", readScript("/data/file"), false, false)); got != sum {
		t.Errorf("cloned volume holds %s, its source held %s", got, sum)
	}
	// Delete the snapshot before the namespace so its content goes too.
	kubectl(t, "delete", "volumesnapshot", "snap", "-n", ns, "--wait")
}
