//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/e2e/cluster"
)

const waitTimeout = 3 * time.Minute

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := env.c.Kubectl(ctxFor(t), args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func apply(t *testing.T, manifest string) {
	t.Helper()
	if err := env.c.Apply(ctxFor(t), manifest); err != nil {
		t.Fatalf("apply:\n%s\n%v", manifest, err)
	}
}

// independent marks a scenario that neither counts the pool's bytes nor
// restarts the driver, and whose objects are all in its own namespace or
// named after it. Such scenarios run concurrently (go test's -parallel, set
// by hack/e2e.sh), after the serial ones (TestCapacityTracking,
// TestDriverRestart) have finished: go test starts the parallel tests of a
// package only when its sequential tests are done, so a serial scenario
// always has the cluster to itself. The scenarios mostly wait on pods and
// attaches, not on the CPU.
func independent(t *testing.T) {
	t.Parallel()
}

// namespace makes a namespace for one test. At the end it is deleted with
// everything in it, and the test fails if its volumes leave anything behind.
func namespace(t *testing.T) string {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	ns := "e2e-" + hex.EncodeToString(b)
	kubectl(t, "create", "namespace", ns)
	t.Cleanup(func() {
		if t.Failed() {
			dumpNamespace(t, ns)
		}
		if _, err := env.c.Kubectl(context.Background(), "delete", "namespace", ns, "--wait", "--timeout=180s"); err != nil {
			t.Errorf("delete namespace %s: %v", ns, err)
			return
		}
		// The claims are gone with the namespace, but their volumes are
		// deleted afterwards. Wait for that, so that the next test starts
		// on a pool that holds only its own volumes (the capacity test
		// counts bytes) and a failed DeleteVolume fails this test.
		eventually(t, "volumes of namespace "+ns+" deleted", waitTimeout, func() error { return volumesLeft(ns) })
	})
	return ns
}

// volumesLeft reports the PersistentVolumes and VolumeSnapshotContents
// with a Delete policy that are left of the claims and snapshots of
// namespace ns.
func volumesLeft(ns string) error {
	var left []string
	for _, q := range [][2]string{
		{"pv", `{range .items[?(@.spec.claimRef.namespace=="` + ns + `")]}{.metadata.name} {.spec.persistentVolumeReclaimPolicy}{"\n"}{end}`},
		{"volumesnapshotcontents", `{range .items[?(@.spec.volumeSnapshotRef.namespace=="` + ns + `")]}{.metadata.name} {.spec.deletionPolicy}{"\n"}{end}`},
	} {
		out, err := env.c.Kubectl(context.Background(), "get", q[0], "-o", "jsonpath="+q[1])
		if err != nil {
			return err
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[1] == "Delete" {
				left = append(left, q[0]+"/"+f[0])
			}
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("not deleted yet: %s", strings.Join(left, ", "))
	}
	return nil
}

func dumpNamespace(t *testing.T, ns string) {
	out, _ := env.c.Kubectl(context.Background(), "get", "pods,pvc,volumesnapshots,events", "-n", ns, "-o", "wide")
	t.Logf("namespace %s at failure:\n%s", ns, out)
	out, _ = env.c.Kubectl(context.Background(), "get", "pv,volumeattachments", "-o", "wide")
	t.Logf("cluster objects at failure:\n%s", out)
}

// waitJSONPath waits until the object's field equals want.
func waitJSONPath(t *testing.T, ns, obj, path, want string) {
	t.Helper()
	args := []string{"wait", obj, "--for=jsonpath={" + path + "}=" + want, fmt.Sprintf("--timeout=%s", waitTimeout)}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	kubectl(t, args...)
}

// eventually polls fn until it returns nil.
func eventually(t *testing.T, what string, timeout time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

type pvcSpec struct {
	name, class, size, mode, access string
	dataSource                      string // YAML of spec.dataSource, indented by 4
}

func pvc(ns string, s pvcSpec) string {
	if s.mode == "" {
		s.mode = "Filesystem"
	}
	if s.access == "" {
		s.access = "ReadWriteOnce"
	}
	m := fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s, namespace: %s}
spec:
  storageClassName: %s
  volumeMode: %s
  accessModes: [%s]
  resources: {requests: {storage: %s}}
`, s.name, ns, s.class, s.mode, s.access, s.size)
	if s.dataSource != "" {
		m += "  dataSource:\n" + s.dataSource
	}
	return m
}

// pod is a busybox pod running script with the claim at /data, or as the
// raw device /dev/xvda for a block claim. readOnly mounts the claim
// read-only.
func pod(ns, name, claim, script string, block, readOnly bool) string {
	vol := fmt.Sprintf("    volumeMounts: [{name: data, mountPath: /data, readOnly: %t}]", readOnly)
	if block {
		vol = "    volumeDevices: [{name: data, devicePath: /dev/xvda}]"
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: ["sh", "-c", %q]
%s
  volumes:
  - name: data
    persistentVolumeClaim: {claimName: %s, readOnly: %t}
`, name, ns, cluster.BusyboxImageName, script, vol, claim, readOnly)
}

// runPod runs a pod to completion and returns its log; the pod is deleted.
func runPod(t *testing.T, ns, name, claim, script string, block, readOnly bool) string {
	t.Helper()
	apply(t, pod(ns, name, claim, script, block, readOnly))
	t.Cleanup(func() {
		_, _ = env.c.Kubectl(context.Background(), "delete", "pod", name, "-n", ns, "--ignore-not-found")
	})
	waitPodDone(t, ns, name)
	logs := kubectl(t, "logs", name, "-n", ns)
	kubectl(t, "delete", "pod", name, "-n", ns, "--wait")
	return logs
}

// waitPodDone waits for the pod to succeed; it fails at once when it fails.
func waitPodDone(t *testing.T, ns, name string) {
	t.Helper()
	eventually(t, "pod "+name+" Succeeded", waitTimeout, func() error {
		phase := kubectl(t, "get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}")
		switch phase {
		case "Succeeded":
			return nil
		case "Failed":
			logs, _ := env.c.Kubectl(context.Background(), "logs", name, "-n", ns)
			t.Fatalf("pod %s failed; log:\n%s", name, logs)
		}
		return fmt.Errorf("phase %q", phase)
	})
}

// writeScript writes size MiB of random data to path and prints its
// checksum; readScript prints the checksum of what is at path.
func writeScript(path string, mib int) string {
	return fmt.Sprintf("set -e; dd if=/dev/urandom of=%s bs=1M count=%d 2>/dev/null; sync; sha256sum %s | cut -d' ' -f1", path, mib, path)
}

func readScript(path string) string {
	return fmt.Sprintf("set -e; sha256sum %s | cut -d' ' -f1", path)
}

func checksum(t *testing.T, log string) string {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(log))
	var last string
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); len(l) == 64 {
			last = l
		}
	}
	if last == "" {
		t.Fatalf("no sha256 in the pod's log:\n%s", log)
	}
	return last
}

type pvInfo struct {
	Spec struct {
		Capacity struct {
			Storage string `json:"storage"`
		} `json:"capacity"`
		CSI struct {
			Driver       string `json:"driver"`
			VolumeHandle string `json:"volumeHandle"`
			FSType       string `json:"fsType"`
		} `json:"csi"`
		NodeAffinity struct {
			Required struct {
				Terms []struct {
					Exprs []struct {
						Key    string   `json:"key"`
						Values []string `json:"values"`
					} `json:"matchExpressions"`
				} `json:"nodeSelectorTerms"`
			} `json:"required"`
		} `json:"nodeAffinity"`
		ReclaimPolicy string `json:"persistentVolumeReclaimPolicy"`
	} `json:"spec"`
}

// boundPV returns the PV bound to the claim.
func boundPV(t *testing.T, ns, claim string) (string, pvInfo) {
	t.Helper()
	name := kubectl(t, "get", "pvc", claim, "-n", ns, "-o", "jsonpath={.spec.volumeName}")
	var pv pvInfo
	if err := json.Unmarshal([]byte(kubectl(t, "get", "pv", name, "-o", "json")), &pv); err != nil {
		t.Fatalf("decode PV %s: %v", name, err)
	}
	return name, pv
}

// imagePath is where the volume's image lives in the pool.
// volumeTopology is what the volumes of the pool under test look like: the
// prefix of their handles and the one term of their PVs' node affinity.
func volumeTopology() (handlePrefix, key, value string) {
	if *flavour == "shared" {
		return "default::", "spool.csi.dev/pool-default", "present"
	}
	return "default:" + env.c.NodeName + ":", "spool.csi.dev/node", env.c.NodeName
}

// volumeCLI runs `spool volume` against the pool under test: through the
// driver's socket, or for the shared flavour, whose node socket serves no
// controller, on the shared pool itself, as one more controller.
func volumeCLI(args ...string) *exec.Cmd {
	if *flavour == "shared" {
		args = append(args, "--pool=default="+env.poolDir+",shared", "--node-id="+env.c.NodeName)
	} else {
		args = append(args, "--pool=default="+env.poolDir, "--node-id="+env.c.NodeName, "--endpoint=unix://"+env.socket)
	}
	return exec.Command(env.spoolBin, append([]string{"volume"}, args...)...)
}

func imagePath(t *testing.T, handle string) string {
	t.Helper()
	parts := strings.Split(handle, ":")
	if len(parts) != 3 {
		t.Fatalf("volume handle %q is not pool:node:token", handle)
	}
	return filepath.Join(pool.VolumeDir(env.poolDir, parts[2]), pool.ImageName)
}

// poolVolumes lists the volume and snapshot directories in the pools.
func poolVolumes() ([]string, error) {
	var all []string
	for _, pool := range pools() {
		for _, d := range []string{"volumes", "snapshots"} {
			entries, err := os.ReadDir(filepath.Join(pool, d))
			if err != nil && !os.IsNotExist(err) {
				return nil, err
			}
			for _, e := range entries {
				all = append(all, filepath.Join(pool, d, e.Name()))
			}
		}
	}
	return all, nil
}

// pools are the pool directories of this run.
func pools() []string {
	if env.sharedDir == "" {
		return []string{env.poolDir}
	}
	return []string{env.poolDir, env.sharedDir}
}

// loopsOf lists loop devices backed by files under dir.
func loopsOf(dir string) ([]string, error) { return cluster.LoopsUnder(context.Background(), dir) }

// checkNothingLeft is scenario 10's check over the whole run: no PV, no
// VolumeAttachment, nothing in the pool, no loop device, no CSI mount.
func checkNothingLeft(ctx context.Context) error {
	var last error
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		last = nothingLeft(ctx)
		if last == nil {
			return nil
		}
		time.Sleep(time.Second)
	}
	return last
}

func nothingLeft(ctx context.Context) error {
	out, err := env.c.Kubectl(ctx, "get", "pv,volumeattachments,volumesnapshotcontents", "-o", "name")
	if err != nil {
		return err
	}
	if s := strings.TrimSpace(out); s != "" {
		return fmt.Errorf("objects left: %s", s)
	}
	vols, err := poolVolumes()
	if err != nil {
		return err
	}
	if len(vols) > 0 {
		return fmt.Errorf("pool still holds %v", vols)
	}
	for _, pool := range pools() {
		if err := nodeHolds(pool); err != nil {
			return err
		}
	}
	return nil
}

// nodeHolds fails when a loop device backed by the pool, a CSI mount or a
// mount under the pool remains on the node.
func nodeHolds(pool string) error {
	loops, err := loopsOf(pool)
	if err != nil {
		return err
	}
	if len(loops) > 0 {
		return fmt.Errorf("loop devices left: %v", loops)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, "/kubernetes.io/csi/") || strings.Contains(l, pool) {
			return fmt.Errorf("CSI mount left: %s", l)
		}
	}
	return nil
}

// storageClass makes a StorageClass for one test and deletes it at the end.
func storageClass(t *testing.T, name, binding string, mountOptions ...string) {
	t.Helper()
	opts := ""
	if len(mountOptions) > 0 {
		opts = "mountOptions: [" + strings.Join(mountOptions, ", ") + "]\n"
	}
	apply(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: %s}
provisioner: spool.csi.dev
volumeBindingMode: %s
reclaimPolicy: Delete
%sparameters: {csi.storage.k8s.io/fstype: ext4}
`, name, binding, opts))
	t.Cleanup(func() { kubectl(t, "delete", "storageclass", name) })
}

// forceDetachLoops detaches loop devices still backed by pool images after
// the driver stopped, and reports them as a leak.
func forceDetachLoops(dir string) error {
	loops, err := cluster.DetachLoopsUnder(context.Background(), dir)
	if err != nil {
		return err
	}
	if len(loops) > 0 {
		return fmt.Errorf("loop devices leaked (now detached): %v", loops)
	}
	return nil
}

func statSize(path string) (int64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// parseQuantity reads the forms of a resource.Quantity the API server
// prints for byte sizes: plain numbers and binary or decimal suffixes.
func parseQuantity(q string) (int64, error) {
	q = strings.TrimSpace(q)
	mult := int64(1)
	for _, s := range []struct {
		suffix string
		mult   int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}} {
		if strings.HasSuffix(q, s.suffix) {
			q, mult = strings.TrimSuffix(q, s.suffix), s.mult
			break
		}
	}
	n, err := strconv.ParseInt(q, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("quantity %q: %w", q, err)
	}
	return n * mult, nil
}

// poolFree is the pool's capacity minus what its volumes and snapshots
// reserve, from the pool's own metadata.
func poolFree() (int64, error) {
	total, err := parseQuantity(*poolSize)
	if err != nil {
		return 0, err
	}
	for _, kind := range []struct{ dir, meta, field string }{{"volumes", "volume.json", "capacityBytes"}, {"snapshots", "snapshot.json", "sizeBytes"}} {
		entries, err := os.ReadDir(filepath.Join(env.poolDir, kind.dir))
		if err != nil && !os.IsNotExist(err) {
			return 0, err
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(env.poolDir, kind.dir, e.Name(), kind.meta))
			if err != nil {
				return 0, err
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				return 0, err
			}
			n, _ := m[kind.field].(float64)
			total -= int64(n)
		}
	}
	return total, nil
}

// snapshotClaim takes a VolumeSnapshot of the claim with the deploy's
// VolumeSnapshotClass and waits until it is ready to use.
func snapshotClaim(t *testing.T, ns, name, claim string) {
	t.Helper()
	apply(t, fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: %s, namespace: %s}
spec:
  volumeSnapshotClassName: spool-snapshots
  source: {persistentVolumeClaimName: %s}
`, name, ns, claim))
	waitJSONPath(t, ns, "volumesnapshot/"+name, ".status.readyToUse", "true")
}
