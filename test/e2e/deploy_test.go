//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

// The deploy tier (make e2e-deploy): Spool and its sidecars run as pods from
// deploy/<flavour>, unchanged, with images made here under the names the
// manifests use. The scenarios then run through the in-cluster driver.

const (
	flavourPool   = "/var/lib/spool/default"
	flavourSocket = "/var/lib/kubelet/plugins/spool.csi.dev/csi.sock"
	systemNS      = "spool-system"
	// The share deploy/shared expects on every node, and its pool. The
	// test makes it as a plain directory, which plays the share on this
	// one-node cluster.
	sharedMount = "/mnt/spool-share"
	sharedPool  = sharedMount + "/spool"
)

// flavourPoolDir is where the flavour's pool `default` is on the node.
func flavourPoolDir() string {
	if *flavour == "shared" {
		return sharedPool
	}
	return flavourPool
}

// makeShare initialises deploy/shared's pool, as an operator does once with
// `spool pool init`. It refuses a share that is already there, or anything
// mounted at its path: that may be a real one. The returned remove deletes
// what it made.
func makeShare(ctx context.Context) (func() error, error) {
	if entries, err := os.ReadDir(sharedMount); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("%s exists and is not empty: not touching what may be a real share", sharedMount)
	}
	if mounted, err := mountinfo.Mounted(sharedMount); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("is %s a mount point: %w", sharedMount, err)
	} else if mounted {
		return nil, fmt.Errorf("%s is a mount point: not touching what may be a real share", sharedMount)
	}
	if err := os.MkdirAll(sharedMount, 0o755); err != nil {
		return nil, err
	}
	remove := func() error { return os.RemoveAll(sharedMount) }
	out, err := exec.CommandContext(ctx, env.spoolBin, "pool", "init", "default="+sharedPool).CombinedOutput()
	if err != nil {
		return nil, errors.Join(fmt.Errorf("spool pool init: %w: %s", err, out), remove())
	}
	return remove, nil
}

// setupFlavour validates every manifest and example against the API server,
// makes and imports the images, applies the flavour and waits for its pods.
// The returned teardown deletes the flavour and checks the node is clean.
// cbtFlavours are the flavours deploy/snapshot-metadata is for: the deploy
// tier applies them with it.
var cbtFlavours = []string{"single-node", "shared"}

// cbtOverlay writes a kustomization of the flavour with the
// snapshot-metadata component, as deploy/README.md tells users to, and
// returns its directory.
func cbtOverlay(root, flavour string) (string, error) {
	dir := filepath.Join(root, "_output", "e2e-deploy", flavour+"-snapshot-metadata")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	rel := func(p string) (string, error) { return filepath.Rel(dir, filepath.Join(root, "deploy", p)) }
	fl, err := rel(flavour)
	if err != nil {
		return "", err
	}
	comp, err := rel("snapshot-metadata")
	if err != nil {
		return "", err
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\ncomponents: [%s]\n", fl, comp)
	return dir, os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644)
}

// setupSnapshotMetadata does what deploy/README.md asks before the
// snapshot-metadata component is applied: the SnapshotMetadataService CRD,
// then deploy/snapshot-metadata/setup.sh (certificate, Secret, object). It
// returns what removes the object again.
func setupSnapshotMetadata(ctx context.Context, root string) (func() error, error) {
	c := env.c
	crds, err := filepath.EvalSymlinks(*cbtCRDDir)
	if err != nil {
		return nil, err
	}
	if _, err := c.Kubectl(ctx, "apply", "--server-side", "-f", crds); err != nil {
		return nil, fmt.Errorf("apply the SnapshotMetadataService CRD: %w", err)
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Established", "--timeout=60s", "-f", crds); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "deploy", "snapshot-metadata", "setup.sh"))
	cmd.Env = append(os.Environ(), "KUBECTL="+c.Bin("kubectl")+" --kubeconfig="+c.Kubeconfig)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("deploy/snapshot-metadata/setup.sh: %w\n%s", err, out)
	}
	return func() error {
		_, err := c.Kubectl(context.Background(), "delete", "snapshotmetadataservice", cluster.DriverName, "--ignore-not-found")
		return err
	}, nil
}

func setupFlavour(ctx context.Context, root string, logf func(string, ...any)) (func() error, error) {
	c := env.c
	dir := filepath.Join(root, "deploy", *flavour)
	var snapFlags []string
	if *flavour == "local" {
		// Snapshots of node-local volumes are taken by each node's
		// csi-snapshotter; the controller must say which node.
		snapFlags = append(snapFlags, "--enable-distributed-snapshotting")
	}
	snapCtl, err := c.InstallSnapshots(ctx, *crdDir, snapFlags...)
	if err != nil {
		return nil, err
	}
	stopSnap := func() error { return snapCtl.Stop(15 * time.Second) }
	if *flavour == "shared" {
		removeShare, err := makeShare(ctx)
		if err != nil {
			return stopSnap, err
		}
		stop := stopSnap
		stopSnap = func() error { return errors.Join(stop(), removeShare()) }
	}

	// First, a dry run of every flavour and example on the server: a typo
	// fails here in seconds, not after a pod times out. Namespaced objects
	// need their namespace to exist for that.
	t0 := time.Now()
	if _, err := c.Kubectl(ctx, "create", "namespace", systemNS); err != nil {
		return stopSnap, err
	}
	for _, d := range []string{"single-node", "local", "shared"} {
		if _, err := c.Kubectl(ctx, "apply", "--dry-run=server", "-k", filepath.Join(root, "deploy", d)); err != nil {
			return stopSnap, fmt.Errorf("server-side dry run of deploy/%s: %w", d, err)
		}
	}
	// The flavours that take deploy/snapshot-metadata are applied with it.
	for _, d := range cbtFlavours {
		overlay, err := cbtOverlay(root, d)
		if err != nil {
			return stopSnap, err
		}
		if _, err := c.Kubectl(ctx, "apply", "--dry-run=server", "-k", overlay); err != nil {
			return stopSnap, fmt.Errorf("server-side dry run of deploy/%s with deploy/snapshot-metadata: %w", d, err)
		}
		if d == *flavour {
			dir = overlay
		}
	}
	if dir != filepath.Join(root, "deploy", *flavour) {
		removeSMS, err := setupSnapshotMetadata(ctx, root)
		if err != nil {
			return stopSnap, err
		}
		stop := stopSnap
		stopSnap = func() error { return errors.Join(removeSMS(), stop()) }
		logf("deploy: deploy/%s with deploy/snapshot-metadata (setup.sh made the certificate and the SnapshotMetadataService)", *flavour)
	}
	if _, err := c.Kubectl(ctx, "apply", "--dry-run=server", "-f", filepath.Join(root, "examples")); err != nil {
		return stopSnap, fmt.Errorf("server-side dry run of examples/: %w", err)
	}
	logf("deploy: every flavour and example passed the server-side dry run in %.1fs", time.Since(t0).Seconds())

	rendered, err := c.Kubectl(ctx, "kustomize", dir)
	if err != nil {
		return stopSnap, err
	}
	t0 = time.Now()
	images, err := c.ImportDeployImages(ctx, rendered, env.spoolBin)
	if err != nil {
		return stopSnap, err
	}
	logf("deploy: made and imported %d images in %.1fs: %s", len(images), time.Since(t0).Seconds(), strings.Join(images, ", "))

	applied := time.Now()
	if _, err := c.Kubectl(ctx, "apply", "-k", dir); err != nil {
		return stopSnap, fmt.Errorf("apply deploy/%s: %w", *flavour, err)
	}
	teardown := func() error {
		var errs []error
		if err := checkNothingLeft(context.Background()); err != nil {
			errs = append(errs, fmt.Errorf("after the scenarios: %w", err))
		}
		if _, err := c.Kubectl(context.Background(), "delete", "-k", dir, "--wait", "--timeout=180s"); err != nil {
			errs = append(errs, err)
		}
		if err := nodeClean(); err != nil {
			errs = append(errs, fmt.Errorf("after deleting deploy/%s: %w", *flavour, err))
		}
		errs = append(errs, forceDetachLoops(flavourPoolDir()), stopSnap())
		return errors.Join(errs...)
	}
	if err := waitWorkloads(ctx, rendered); err != nil {
		out, _ := c.Kubectl(ctx, "get", "pods,events", "-n", systemNS, "-o", "wide")
		logf("deploy: pods and events:\n%s", out)
		return teardown, err
	}
	ready := time.Since(applied)
	if err := registered(ctx); err != nil {
		return teardown, err
	}
	logf("deploy: kubectl apply -k deploy/%s to all pods Ready: %.1fs; driver registered with kubelet after %.1fs",
		*flavour, ready.Seconds(), time.Since(applied).Seconds())
	if err := doctorInNodePod(ctx, logf); err != nil {
		return teardown, err
	}
	env.poolDir, env.socket = flavourPoolDir(), flavourSocket
	return teardown, nil
}

// doctorInNodePod runs `spool doctor` in the flavour's node pod, as
// docs/operations.md tells operators to, with the pool the pod serves: on
// a node that serves volumes, every check must pass (a fail is an error).
func doctorInNodePod(ctx context.Context, logf func(string, ...any)) error {
	c := env.c
	pod, err := c.Kubectl(ctx, "-n", systemNS, "get", "pods", "-l", "app.kubernetes.io/component=node",
		"-o", "jsonpath={.items[0].metadata.name}")
	if err != nil {
		return err
	}
	poolArg := "default=" + flavourPool
	if *flavour == "shared" {
		poolArg = "default=" + sharedPool + ",shared"
	}
	out, err := c.Kubectl(ctx, "-n", systemNS, "exec", strings.TrimSpace(pod), "-c", "spool", "--",
		"spool", "doctor", "--pool", poolArg, "-o", "json")
	var results []struct{ Check, Verdict, Detail, Fix string }
	if jerr := json.Unmarshal([]byte(out), &results); jerr != nil {
		return fmt.Errorf("spool doctor in %s: %v; output %q (%v)", pod, err, out, jerr)
	}
	var failed []string
	for _, r := range results {
		logf("deploy: spool doctor in the node pod: %-4s %s: %s", r.Verdict, r.Check, r.Detail)
		if r.Verdict == "fail" {
			failed = append(failed, r.Check+": "+r.Detail)
		}
	}
	if err != nil || len(failed) > 0 {
		return fmt.Errorf("spool doctor in the node pod %s: %v; failed: %s", pod, err, strings.Join(failed, "; "))
	}
	return nil
}

// waitWorkloads waits for every DaemonSet and Deployment in the rendered
// manifests to roll out.
func waitWorkloads(ctx context.Context, rendered string) error {
	var kind string
	for _, l := range strings.Split(rendered, "\n") {
		if k, ok := strings.CutPrefix(l, "kind: "); ok {
			kind = strings.TrimSpace(k)
			continue
		}
		name, ok := strings.CutPrefix(l, "  name: ")
		if !ok || (kind != "DaemonSet" && kind != "Deployment") {
			continue
		}
		obj := strings.ToLower(kind) + "/" + strings.TrimSpace(name)
		if _, err := env.c.Kubectl(ctx, "rollout", "status", "-n", systemNS, obj, "--timeout=240s"); err != nil {
			return fmt.Errorf("%s did not roll out: %w", obj, err)
		}
		kind = ""
	}
	return nil
}

func registered(ctx context.Context) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := env.c.Kubectl(ctx, "get", "csinode", env.c.NodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		if err == nil && strings.Contains(out, cluster.DriverName) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubelet has not registered %s: %q %v", cluster.DriverName, out, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// nodeClean checks, after the flavour is deleted, that its pods are gone and
// that nothing of it remains mounted or attached on the node.
func nodeClean() error {
	out, err := env.c.Kubectl(context.Background(), "get", "pods", "-n", systemNS, "-o", "name", "--ignore-not-found")
	if err != nil && !strings.Contains(err.Error(), "not found") {
		return err
	}
	if strings.TrimSpace(out) != "" {
		return fmt.Errorf("pods left: %s", out)
	}
	return nodeHolds(flavourPoolDir())
}
