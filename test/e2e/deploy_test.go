//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
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

// install says how the deploy tier installs the flavour.
var install = flag.String("e2e.install", "kustomize", "with -e2e.flavour: install it with kubectl apply -k deploy/<flavour> (kustomize) or helm install charts/spool (helm)")

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

// installer installs the flavour as a user would (-e2e.install):
//   - kustomize: kubectl apply -k of the flavour's directory;
//   - helm: helm install of charts/spool with the values that select the
//     same flavour;
//   - adopt: kubectl apply -k, then the move to Helm that
//     docs/operations.md describes (charts/spool/adopt.sh, helm install),
//     which must not restart a pod.
type installer struct {
	mode     string
	dir      string   // kustomize
	chart    string   // helm
	sets     []string // helm --set
	describe string
}

func newInstaller(root, dir string, cbt bool) (*installer, error) {
	sets := []string{"flavour=" + *flavour}
	if cbt {
		sets = append(sets, "snapshotMetadata.enabled=true")
	}
	in := &installer{mode: *install, dir: dir, chart: filepath.Join(root, "charts", "spool"), sets: sets}
	helmInstall := "helm install spool charts/spool --set " + strings.Join(sets, ",")
	switch *install {
	case "kustomize":
		in.describe = "kubectl apply -k deploy/" + *flavour
	case "helm":
		in.describe = helmInstall
	case "adopt":
		in.describe = "kubectl apply -k deploy/" + *flavour + ", charts/spool/adopt.sh, " + helmInstall + " --force-conflicts"
	default:
		return nil, fmt.Errorf("-e2e.install %q: kustomize, helm or adopt", *install)
	}
	return in, nil
}

func (in *installer) String() string { return in.describe }

// helmCmd runs the cache's helm against the cluster.
func helmCmd(ctx context.Context, args ...string) (string, error) {
	c := env.c
	cmd := exec.CommandContext(ctx, c.Bin("helm"), append([]string{"--kubeconfig", c.Kubeconfig, "--namespace", systemNS}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (in *installer) setArgs() []string {
	var out []string
	for _, s := range in.sets {
		out = append(out, "--set", s)
	}
	return out
}

// render returns the manifests the install applies.
func (in *installer) render(ctx context.Context) (string, error) {
	if in.mode != "helm" {
		return env.c.Kubectl(ctx, "kustomize", in.dir)
	}
	return helmCmd(ctx, append([]string{"template", "spool", in.chart}, in.setArgs()...)...)
}

// install applies the flavour. Helm installs into a namespace that exists
// (setupFlavour made it), labelled for the privileged node plugin as
// charts/spool/README.md says.
func (in *installer) install(ctx context.Context) error {
	if in.mode != "helm" {
		if _, err := env.c.Kubectl(ctx, "apply", "-k", in.dir); err != nil {
			return err
		}
	}
	if in.mode == "kustomize" {
		return nil
	}
	var before, rendered string
	if in.mode == "adopt" {
		var err error
		if rendered, err = in.render(ctx); err != nil {
			return err
		}
		if err := waitWorkloads(ctx, rendered); err != nil {
			return err
		}
		if before, err = podUIDs(ctx); err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, filepath.Join(in.chart, "adopt.sh"), "-k", in.dir, "-n", systemNS)
		cmd.Env = append(os.Environ(), "KUBECTL="+env.c.Bin("kubectl")+" --kubeconfig="+env.c.Kubeconfig)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("charts/spool/adopt.sh: %w\n%s", err, out)
		}
	}
	if _, err := env.c.Kubectl(ctx, "label", "namespace", systemNS, "--overwrite",
		"pod-security.kubernetes.io/enforce=privileged", "pod-security.kubernetes.io/audit=privileged",
		"pod-security.kubernetes.io/warn=privileged"); err != nil {
		return err
	}
	args := append([]string{"install", "spool", in.chart}, in.setArgs()...)
	if in.mode == "adopt" {
		// kubectl apply owns the fields; the release takes them over
		// (docs/operations.md).
		args = append(args, "--force-conflicts")
	}
	if _, err := helmCmd(ctx, args...); err != nil {
		return err
	}
	if in.mode == "adopt" {
		// The chart renders the kustomize flavour's pod templates: taking
		// the objects over must leave every pod as it was.
		if err := waitWorkloads(ctx, rendered); err != nil {
			return err
		}
		after, err := podUIDs(ctx)
		if err != nil {
			return err
		}
		if after != before {
			return fmt.Errorf("the move to Helm replaced pods: before %s; after %s", before, after)
		}
	}
	return nil
}

// podUIDs lists the pods in Spool's namespace with their UIDs.
func podUIDs(ctx context.Context) (string, error) {
	return env.c.Kubectl(ctx, "get", "pods", "-n", systemNS, "--sort-by=.metadata.name",
		"-o", `jsonpath={range .items[*]}{.metadata.name}={.metadata.uid} {end}`)
}

// uninstall removes what install applied, and waits for it to go.
func (in *installer) uninstall(ctx context.Context) error {
	// helm and adopt both end as a Helm release.
	if in.mode == "kustomize" {
		_, err := env.c.Kubectl(ctx, "delete", "-k", in.dir, "--wait", "--timeout=180s")
		return err
	}
	if _, err := helmCmd(ctx, "uninstall", "spool", "--wait", "--timeout", "180s"); err != nil {
		return err
	}
	// The release is gone; the namespace is the user's (README), and goes
	// last, as kubectl delete -k removes it.
	_, err := env.c.Kubectl(ctx, "delete", "namespace", systemNS, "--wait", "--timeout=180s")
	return err
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

	cbt := dir != filepath.Join(root, "deploy", *flavour)
	inst, err := newInstaller(root, dir, cbt)
	if err != nil {
		return stopSnap, err
	}
	rendered, err := inst.render(ctx)
	if err != nil {
		return stopSnap, err
	}
	t0 = time.Now()
	images, err := c.ImportDeployImages(ctx, rendered, env.spoolBin)
	if err != nil {
		return stopSnap, err
	}
	logf("deploy: made and imported %d images in %.1fs: %s", len(images), time.Since(t0).Seconds(), strings.Join(images, ", "))

	// up: the flavour came up, and the scenarios may have run.
	up := false
	teardown := func() error {
		var errs []error
		if up {
			if err := checkNothingLeft(context.Background()); err != nil {
				errs = append(errs, fmt.Errorf("after the scenarios: %w", err))
			}
		}
		if err := inst.uninstall(context.Background()); err != nil {
			errs = append(errs, err)
		}
		if err := nodeClean(); err != nil {
			errs = append(errs, fmt.Errorf("after removing deploy/%s: %w", *flavour, err))
		}
		errs = append(errs, forceDetachLoops(flavourPoolDir()), stopSnap())
		return errors.Join(errs...)
	}
	applied := time.Now()
	if err := inst.install(ctx); err != nil {
		// What it applied before it failed goes too.
		return teardown, fmt.Errorf("%s: %w", inst, err)
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
	logf("deploy: %s to all pods Ready: %.1fs; driver registered with kubelet after %.1fs",
		inst, ready.Seconds(), time.Since(applied).Seconds())
	if err := doctorInNodePod(ctx, logf); err != nil {
		return teardown, err
	}
	env.poolDir, env.socket = flavourPoolDir(), flavourSocket
	up = true
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
