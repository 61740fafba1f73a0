//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

// cbtRange is a BlockMetadata tuple as upstream's JSON emitter prints it.
type cbtRange struct {
	Offset int64 `json:"byte_offset"`
	Size   int64 `json:"size_bytes"`
}

// Scenario 13: changed block tracking through the real csi-snapshot-metadata
// sidecar and a backup client on upstream's client library. A block claim
// is written, snapshotted, written again (whole blocks, and 5 bytes inside
// one) and snapshotted again; the client lists the first snapshot's
// allocated blocks and the blocks changed since it, with a token of its
// own ServiceAccount. A claim restored from the first snapshot, patched
// with only the changed ranges read from a claim restored from the second,
// then holds the second's bytes.
func TestChangedBlockTracking(t *testing.T) {
	independent(t)
	if env.spool == nil || env.spool.SnapshotMetadataAddress == "" {
		t.Fatal("the csi-snapshot-metadata sidecar is not running (run via make e2e)")
	}
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "src", class: "spool-block", size: "64Mi", mode: "Block"}))
	runPod(t, ns, "writer-1", "src", "set -e;"+
		" dd if=/dev/urandom of=/dev/xvda bs=4096 count=1024 2>/dev/null;"+
		" dd if=/dev/urandom of=/dev/xvda bs=4096 seek=10000 count=256 2>/dev/null; sync", true, false)
	snapshotClaim(t, ns, "first", "src")
	runPod(t, ns, "writer-2", "src", "set -e;"+
		" dd if=/dev/urandom of=/dev/xvda bs=4096 seek=100 count=8 2>/dev/null;"+
		" dd if=/dev/urandom of=/dev/xvda bs=4096 seek=12000 count=1 2>/dev/null;"+
		" printf spool | dd of=/dev/xvda bs=1 seek=5000000 2>/dev/null; sync", true, false)
	snapshotClaim(t, ns, "second", "src")
	t.Cleanup(func() {
		_, _ = env.c.Kubectl(context.Background(), "delete", "volumesnapshot", "first", "second", "-n", ns, "--ignore-not-found", "--wait")
	})

	// The backup client's identity: a ServiceAccount bound to the client
	// role deploy/snapshot-metadata ships.
	kubectl(t, "create", "serviceaccount", "backup", "-n", ns)
	binding := "cbt-backup-" + ns
	kubectl(t, "create", "clusterrolebinding", binding, "--clusterrole=spool-snapshot-metadata-client", "--serviceaccount="+ns+":backup")
	t.Cleanup(func() {
		_, _ = env.c.Kubectl(context.Background(), "delete", "clusterrolebinding", binding, "--ignore-not-found")
	})
	kc, err := env.c.ServiceAccountKubeconfig(ctxFor(t), ns, "backup")
	if err != nil {
		t.Fatal(err)
	}
	list := func(args ...string) []cbtRange {
		t.Helper()
		var out []byte
		for attempt := 1; ; attempt++ {
			cmd := exec.CommandContext(ctxFor(t), env.c.Bin("spool-cbt-lister"), append([]string{"-kubeconfig", kc, "-n", ns,
				"-service-account", "backup", "-service-account-namespace", ns, "-max-results", "2"}, args...)...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			var err error
			if out, err = cmd.Output(); err == nil {
				break
			}
			// The sidecar notices that Spool restarted (scenario 9) only
			// on its next call, which then fails Unavailable while the
			// sidecar exits to be restarted, as in a pod: a backup client
			// retries.
			if attempt < 3 && strings.Contains(stderr.String(), "code = Unavailable") {
				t.Logf("spool-cbt-lister %v, attempt %d: %s; retrying", args, attempt, strings.TrimSpace(stderr.String()))
				time.Sleep(3 * time.Second)
				continue
			}
			t.Fatalf("spool-cbt-lister %v: %v\n%s", args, err, stderr.String())
		}
		var msgs []struct {
			Type     int        `json:"block_metadata_type"`
			Capacity int64      `json:"volume_capacity_bytes"`
			Ranges   []cbtRange `json:"block_metadata"`
		}
		if err := json.Unmarshal(out, &msgs); err != nil {
			t.Fatalf("spool-cbt-lister %v printed %q: %v", args, out, err)
		}
		var all []cbtRange
		for _, m := range msgs {
			if m.Type != 2 || m.Capacity != 64<<20 || len(m.Ranges) > 2 {
				t.Fatalf("message %+v: want VARIABLE_LENGTH (2), capacity 64 MiB, at most 2 ranges", m)
			}
			all = append(all, m.Ranges...)
		}
		t.Logf("spool-cbt-lister %v: %d messages, ranges %v", args, len(msgs), all)
		return all
	}
	covers := func(rs []cbtRange, off, n int64) bool {
		for _, r := range rs {
			if r.Offset <= off && off+n <= r.Offset+r.Size {
				return true
			}
		}
		return false
	}
	allocated := list("-s", "first")
	for _, w := range [][2]int64{{0, 4 << 20}, {10000 * 4096, 1 << 20}} {
		if !covers(allocated, w[0], w[1]) {
			t.Errorf("the first snapshot's allocated ranges %v do not cover the %d bytes written at %d", allocated, w[1], w[0])
		}
	}
	delta := list("-s", "second", "-p", "first")
	total := int64(0)
	for _, r := range delta {
		total += r.Size
	}
	for _, w := range [][2]int64{{100 * 4096, 8 * 4096}, {12000 * 4096, 4096}, {5000000, 5}} {
		if !covers(delta, w[0], w[1]) {
			t.Errorf("the delta %v does not cover the %d bytes written at %d", delta, w[1], w[0])
		}
	}
	// The pool copies or reflinks; either way about the 10 blocks written.
	if total > 64<<10 {
		t.Errorf("the delta reports %d bytes for 41 KiB written", total)
	}

	// Rebuild the second snapshot from the first and the delta alone.
	for _, c := range []struct{ name, snap string }{{"base", "first"}, {"target", "second"}} {
		apply(t, pvc(ns, pvcSpec{name: c.name, class: "spool-block", size: "64Mi", mode: "Block",
			dataSource: "    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: " + c.snap + "\n"}))
	}
	script := []string{"set -e", "echo before $(sha256sum /dev/base | cut -d' ' -f1) $(sha256sum /dev/target | cut -d' ' -f1)"}
	for _, r := range delta {
		if r.Offset%4096 != 0 || r.Size%4096 != 0 {
			t.Fatalf("range %+v is not in whole 4 KiB blocks", r)
		}
		script = append(script, fmt.Sprintf("dd if=/dev/target of=/dev/base bs=4096 skip=%d seek=%d count=%d 2>/dev/null",
			r.Offset/4096, r.Offset/4096, r.Size/4096))
	}
	script = append(script, "sync", "echo after $(sha256sum /dev/base | cut -d' ' -f1)")
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: rebuild, namespace: %s}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: ["sh", "-c", %q]
    volumeDevices: [{name: base, devicePath: /dev/base}, {name: target, devicePath: /dev/target}]
  volumes:
  - {name: base, persistentVolumeClaim: {claimName: base}}
  - {name: target, persistentVolumeClaim: {claimName: target}}
`, ns, cluster.BusyboxImageName, strings.Join(script, "; ")))
	waitPodDone(t, ns, "rebuild")
	out := kubectl(t, "logs", "rebuild", "-n", ns)
	kubectl(t, "delete", "pod", "rebuild", "-n", ns, "--wait")
	var before, target, after string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 3 && f[0] == "before":
			before, target = f[1], f[2]
		case len(f) == 2 && f[0] == "after":
			after = f[1]
		}
	}
	if before == "" || after == "" || before == target {
		t.Fatalf("rebuild pod printed %q: want distinct checksums before, then one after", out)
	}
	if after != target {
		t.Fatalf("the first snapshot plus the delta's ranges of the second hold %s; the second holds %s", after, target)
	}
	t.Logf("rebuilt the second snapshot (%s) from the first and %d bytes of delta", target, total)
}
