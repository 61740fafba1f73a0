//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Scenario 3: a pre-provisioned PV. The operator makes the volume with
// `spool volume create` (through the running driver's socket, which holds
// the pool), applies the PV it prints and a claim bound to it; a pod mounts
// it. With the Retain policy the image outlives the claim.
func TestPreProvisionedVolume(t *testing.T) {
	independent(t)
	ns := namespace(t)
	pvName := "pre-" + ns
	spool := func(args ...string) string {
		t.Helper()
		out, err := volumeCLI(args...).Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			t.Fatalf("spool volume %v: %v: %s", args, err, stderr)
		}
		return string(out)
	}
	manifest := spool("create", "--size=64Mi", "--name="+pvName, "--fs=ext4")
	// The pool may still hold an earlier scenario's volume whose deletion is
	// in flight, so the new handle is the listed one the manifest names.
	handle := ""
	for _, h := range strings.Fields(spool("list", "-o", "handle")) {
		if strings.Contains(manifest, "volumeHandle: \""+h+"\"") {
			handle = h
		}
	}
	if handle == "" || !strings.Contains(manifest, "persistentVolumeReclaimPolicy: Retain") {
		t.Fatalf("the printed PV does not name a listed volume with Retain:\n%s", manifest)
	}
	// On failure, leave neither the volume nor its PV behind (cleanups run
	// last-in first-out: the PV goes first).
	t.Cleanup(func() {
		if t.Failed() {
			_ = volumeCLI("delete", handle).Run()
		}
	})
	apply(t, manifest)
	t.Cleanup(func() { _, _ = env.c.Kubectl(ctxFor(t), "delete", "pv", pvName, "--ignore-not-found") })
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: %s}
spec:
  storageClassName: ""
  volumeName: %s
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
`, ns, pvName))
	waitJSONPath(t, ns, "pvc/data", ".status.phase", "Bound")
	sum := checksum(t, runPod(t, ns, "writer", "data", writeScript("/data/file", 4), false, false))
	if got := checksum(t, runPod(t, ns, "reader", "data", readScript("/data/file"), false, false)); got != sum {
		t.Fatalf("read %s, wrote %s", got, sum)
	}

	kubectl(t, "delete", "pvc", "data", "-n", ns, "--wait")
	waitJSONPath(t, "", "pv/"+pvName, ".status.phase", "Released")
	img := imagePath(t, handle)
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("Retain: the image is gone after the claim was deleted: %v", err)
	}
	// The operator reclaims it: PV first, then the volume.
	kubectl(t, "delete", "pv", pvName, "--wait")
	spool("delete", handle)
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("image still there after spool volume delete: %v", err)
	}
}
