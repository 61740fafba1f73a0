//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

// Scenario 5: a raw block claim used by a pod as a device.
func TestRawBlock(t *testing.T) {
	independent(t)
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "dev", class: "spool-block", size: "64Mi", mode: "Block"}))
	out := runPod(t, ns, "writer", "dev",
		"set -e; blockdev --getsize64 /dev/xvda; dd if=/dev/urandom of=/tmp/d bs=1M count=8 2>/dev/null;"+
			" dd if=/tmp/d of=/dev/xvda bs=1M conv=fsync 2>/dev/null; sha256sum /tmp/d | cut -d' ' -f1", true, false)
	if !strings.HasPrefix(out, fmt.Sprint(64<<20)) {
		t.Errorf("the pod's device is not 64Mi: %q", out)
	}
	sum := checksum(t, out)
	got := checksum(t, runPod(t, ns, "reader", "dev",
		"set -e; dd if=/dev/xvda bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1", true, false))
	if got != sum {
		t.Fatalf("read back %s from the device, wrote %s", got, sum)
	}
}

// Scenario 6: xfs and btrfs classes, mount options and read-only mounts.
func TestFilesystemsAndMountOptions(t *testing.T) {
	independent(t)
	for _, tc := range []struct{ fs, class, size string }{
		{"xfs", "spool-xfs", "300Mi"},
		{"btrfs", "spool-btrfs", "256Mi"},
	} {
		t.Run(tc.fs, func(t *testing.T) {
			independent(t)
			ns := namespace(t)
			apply(t, pvc(ns, pvcSpec{name: "data", class: tc.class, size: tc.size}))
			out := runPod(t, ns, "writer", "data", "grep ' /data ' /proc/mounts; "+writeScript("/data/file", 4), false, false)
			if !strings.Contains(out, " /data "+tc.fs+" rw") {
				t.Errorf("/data is not a writable %s mount: %q", tc.fs, out)
			}
			sum := checksum(t, out)
			ro := runPod(t, ns, "reader", "data",
				"grep ' /data ' /proc/mounts; if touch /data/new 2>/dev/null; then echo WROTE; fi; "+readScript("/data/file"), false, true)
			if !strings.Contains(ro, " /data "+tc.fs+" ro") || strings.Contains(ro, "WROTE") {
				t.Errorf("read-only mount is writable or not ro: %q", ro)
			}
			if got := checksum(t, ro); got != sum {
				t.Errorf("read %s through the read-only mount, wrote %s", got, sum)
			}
		})
	}
	t.Run("mount options", func(t *testing.T) {
		independent(t)
		ns := namespace(t)
		class := "spool-e2e-opts-" + ns
		storageClass(t, class, "WaitForFirstConsumer", "noatime", "nodiratime")
		apply(t, pvc(ns, pvcSpec{name: "data", class: class, size: "64Mi"}))
		out := runPod(t, ns, "check", "data", "grep ' /data ' /proc/mounts", false, false)
		if !strings.Contains(out, " /data ext4 ") || !strings.Contains(out, "noatime") || !strings.Contains(out, "nodiratime") {
			t.Errorf("mount options not applied: %q", out)
		}
	})
}

// Scenario 14: fsGroupPolicy File. A file written by root is, once a pod
// with fsGroup 2000 mounts the claim, owned by group 2000 and writable by
// the pod's non-root user through the group, as are the volume's root
// (setgid, so new files join the group) and the files the pod makes.
func TestFSGroup(t *testing.T) {
	independent(t)
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-ext4", size: "64Mi"}))
	runPod(t, ns, "root-writer", "data", "set -e; echo before > /data/old; chmod 0644 /data/old; sync", false, false)
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: grouped, namespace: %s}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, runAsGroup: 3000, fsGroup: 2000}
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: ["sh", "-c", "set -e; echo after >> /data/old; echo new > /data/new; sync; stat -c 'root %%g %%A' /data; stat -c 'old %%g %%u' /data/old; stat -c 'new %%g %%u' /data/new"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes:
  - {name: data, persistentVolumeClaim: {claimName: data}}
`, ns, cluster.BusyboxImageName))
	waitPodDone(t, ns, "grouped")
	out := kubectl(t, "logs", "grouped", "-n", ns)
	kubectl(t, "delete", "pod", "grouped", "-n", ns, "--wait")
	got := map[string][]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(l); len(f) == 3 {
			got[f[0]] = f[1:]
		}
	}
	if r := got["root"]; len(r) != 2 || r[0] != "2000" || len(r[1]) != 10 || r[1][5] != 'w' || r[1][6] != 's' {
		t.Errorf("the volume's root: %v, want group 2000, group-writable and setgid (log %q)", r, out)
	}
	if o := got["old"]; len(o) != 2 || o[0] != "2000" || o[1] != "0" {
		t.Errorf("root's file: %v, want group 2000 and owner 0 (log %q)", o, out)
	}
	if n := got["new"]; len(n) != 2 || n[0] != "2000" || n[1] != "1000" {
		t.Errorf("the pod's new file: %v, want group 2000 and owner 1000 (log %q)", n, out)
	}
}
