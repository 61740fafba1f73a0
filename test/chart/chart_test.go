//go:build chart

// Package chart checks charts/spool against deploy/ (make chart): with
// default values, each flavour of the chart renders the same objects as
// `kubectl kustomize deploy/<flavour>`, so the two cannot drift; values
// take effect; bad values fail with a message that names them; and the
// chart's README describes every value.
package chart

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

var (
	helmBin    = flag.String("helm", os.Getenv("HELM"), "helm binary")
	kubectlBin = flag.String("kubectl", os.Getenv("KUBECTL"), "kubectl binary (for kubectl kustomize)")
)

const (
	namespace = "spool-system"
	release   = "spool"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func need(t *testing.T) {
	t.Helper()
	for name, bin := range map[string]string{"helm": *helmBin, "kubectl": *kubectlBin} {
		if bin == "" {
			t.Fatalf("no %s binary: pass -%s or set %s (hack/chart.sh does)", name, name, strings.ToUpper(name))
		}
	}
}

func run(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), err
}

// helmTemplate renders the chart with the given --set values.
func helmTemplate(t *testing.T, sets ...string) (string, error) {
	t.Helper()
	args := []string{"template", release, filepath.Join(repoRoot(t), "charts", "spool"), "--namespace", namespace}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	return run(t, *helmBin, args...)
}

type object = map[string]any

// parse splits rendered manifests into objects keyed kind/namespace/name.
func parse(t *testing.T, rendered string) map[string]object {
	t.Helper()
	out := map[string]object{}
	dec := yaml.NewDecoder(strings.NewReader(rendered))
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("parse rendered manifests: %v", err)
		}
		if o == nil {
			continue
		}
		meta, _ := o["metadata"].(object)
		ns, _ := meta["namespace"].(string)
		key := fmt.Sprintf("%v/%s/%v", o["kind"], ns, meta["name"])
		if _, dup := out[key]; dup {
			t.Errorf("%s rendered twice", key)
		}
		out[key] = o
	}
	return out
}

// helmLabels are the labels the chart adds to every object's metadata and
// the kustomize flavours do not have (pod templates and selectors carry
// none of them).
var helmLabels = []string{"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "helm.sh/chart"}

func dropHelmLabels(t *testing.T, key string, o object) {
	t.Helper()
	meta, _ := o["metadata"].(object)
	labels, _ := meta["labels"].(object)
	for _, l := range helmLabels {
		if _, ok := labels[l]; !ok {
			t.Errorf("%s: the chart did not label it %s", key, l)
		}
		delete(labels, l)
	}
}

// diff lists where a and b differ, as paths.
func diff(path string, a, b any, out *[]string) {
	if reflect.DeepEqual(a, b) {
		return
	}
	switch av := a.(type) {
	case object:
		bv, ok := b.(object)
		if !ok {
			break
		}
		keys := map[string]bool{}
		for k := range av {
			keys[k] = true
		}
		for k := range bv {
			keys[k] = true
		}
		var sorted []string
		for k := range keys {
			sorted = append(sorted, k)
		}
		sort.Strings(sorted)
		for _, k := range sorted {
			diff(path+"."+k, av[k], bv[k], out)
		}
		return
	case []any:
		bv, ok := b.([]any)
		if !ok || len(av) != len(bv) {
			break
		}
		for i := range av {
			diff(fmt.Sprintf("%s[%d]", path, i), av[i], bv[i], out)
		}
		return
	}
	*out = append(*out, fmt.Sprintf("%s: kustomize %s, chart %s", path, short(a), short(b)))
}

func short(v any) string {
	if v == nil {
		return "(none)"
	}
	b, err := yaml.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300] + " …"
	}
	return strings.ReplaceAll(s, "\n", " ⏎ ")
}

// countKinds summarises keys (kind/namespace/name) as "2 ClusterRole, ...".
func countKinds(keys []string) string {
	n := map[string]int{}
	for _, k := range keys {
		n[strings.SplitN(k, "/", 2)[0]]++
	}
	var out []string
	for kind, c := range n {
		out = append(out, fmt.Sprintf("%d %s", c, kind))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

// overlay writes into dir the kustomization deploy/README.md tells users
// to write for changed block tracking: the flavour and the component
// (kustomize wants both as relative paths).
func overlay(dir, flavour, component string) error {
	fl, err := filepath.Rel(dir, flavour)
	if err != nil {
		return err
	}
	comp, err := filepath.Rel(dir, component)
	if err != nil {
		return err
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\ncomponents: [%s]\n", fl, comp)
	return os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644)
}

// kustomizeOnly are the objects the kustomize flavours have and the chart
// leaves out on purpose: Helm installs into a namespace that exists before
// the release (README.md: create it with its Pod Security labels).
var kustomizeOnly = map[string]bool{"Namespace//" + namespace: true}

// TestChartMatchesKustomize renders each flavour both ways, with the
// changed block tracking component where it applies, and compares every
// object field by field.
func TestChartMatchesKustomize(t *testing.T) {
	need(t)
	root := repoRoot(t)
	cases := []struct {
		name, flavour string
		cbt           bool
	}{
		{"single-node", "single-node", false},
		{"local", "local", false},
		{"shared", "shared", false},
		{"single-node+snapshot-metadata", "single-node", true},
		{"shared+snapshot-metadata", "shared", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(root, "deploy", tc.flavour)
			sets := []string{"flavour=" + tc.flavour}
			if tc.cbt {
				// The overlay deploy/README.md tells users to write.
				dir = t.TempDir()
				if err := overlay(dir, filepath.Join(root, "deploy", tc.flavour), filepath.Join(root, "deploy", "snapshot-metadata")); err != nil {
					t.Fatal(err)
				}
				sets = append(sets, "snapshotMetadata.enabled=true")
			}
			kout, err := run(t, *kubectlBin, "kustomize", dir)
			if err != nil {
				t.Fatal(err)
			}
			hout, err := helmTemplate(t, sets...)
			if err != nil {
				t.Fatal(err)
			}
			kobjs, hobjs := parse(t, kout), parse(t, hout)
			var kinds []string
			for key, k := range kobjs {
				h, ok := hobjs[key]
				if !ok {
					if !kustomizeOnly[key] {
						t.Errorf("%s: in kubectl kustomize %s, not in the chart", key, dir)
					}
					continue
				}
				dropHelmLabels(t, key, h)
				var d []string
				diff(key, k, h, &d)
				for _, l := range d {
					t.Errorf("%s", l)
				}
				kinds = append(kinds, key)
			}
			for key := range hobjs {
				if _, ok := kobjs[key]; !ok {
					t.Errorf("%s: in the chart, not in kubectl kustomize %s", key, dir)
				}
			}
			t.Logf("%d objects equal: %s", len(kinds), countKinds(kinds))
		})
	}
}

// compare returns the differences between two renderings, Helm's labels
// aside.
func compare(t *testing.T, kout, hout string) []string {
	t.Helper()
	kobjs, hobjs := parse(t, kout), parse(t, hout)
	var d []string
	for key, k := range kobjs {
		if h, ok := hobjs[key]; ok {
			dropHelmLabels(t, key, h)
			diff(key, k, h, &d)
		} else if !kustomizeOnly[key] {
			d = append(d, key+": missing")
		}
	}
	for key := range hobjs {
		if _, ok := kobjs[key]; !ok {
			d = append(d, key+": extra")
		}
	}
	sort.Strings(d)
	return d
}

// TestComparisonCatchesDrift: the comparison above fails when one value
// moves away from what deploy/ says, and names the field.
func TestComparisonCatchesDrift(t *testing.T) {
	need(t)
	kout, err := run(t, *kubectlBin, "kustomize", filepath.Join(repoRoot(t), "deploy", "local"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ set, want string }{
		{"sidecars.timeout=61s", "DaemonSet/spool-system/spool-node.spec.template.spec.containers[1].args[2]: kustomize --timeout=60s, chart --timeout=61s"},
		{"controller.replicas=3", "Deployment/spool-system/spool-controller.spec.replicas: kustomize 2, chart 3"},
		{"volumeSnapshotClass.create=false", "VolumeSnapshotClass//spool-snapshots: missing"},
		{"metrics.serviceMonitor.enabled=true", "ServiceMonitor/spool-system/spool: extra"},
	} {
		hout, err := helmTemplate(t, "flavour=local", tc.set)
		if err != nil {
			t.Fatal(err)
		}
		d := compare(t, kout, hout)
		if !strings.Contains(strings.Join(d, "\n"), tc.want) {
			t.Errorf("--set %s: differences %q, want one %q", tc.set, d, tc.want)
		}
	}
}

// TestBadValues: values the chart refuses, each with a message that
// names what is wrong.
func TestBadValues(t *testing.T) {
	need(t)
	for _, tc := range []struct {
		sets []string
		want string
	}{
		{[]string{"flavour=multi"}, `flavour must be single-node, local or shared, not "multi"`},
		{[]string{"flavour=local", "snapshotMetadata.enabled=true"}, "changed block tracking is for the single-node and shared flavours"},
		{[]string{"localPools.pools[0].name=default", "localPools.pools[0].dir=/etc"}, `dir "/etc" must be an absolute path beneath hostDir /var/lib/spool`},
		{[]string{"localPools.pools[0].name=default", "localPools.pools[0].dir=/var/lib/spool/../../etc"}, `must be an absolute path beneath hostDir`},
		{[]string{"localPools.pools[0].name=Bad_Name"}, `pool name "Bad_Name"`},
		{[]string{"flavour=shared", "sharedPools.pools[0].name=default", "sharedPools.pools[0].dir=relative/dir"}, "must be an absolute path"},
		{[]string{"storageClasses[0].name=x", "storageClasses[0].fsType=ntfs"}, `fsType must be ext4, xfs or btrfs, not "ntfs"`},
		{[]string{"metrics.enabled=false", "metrics.serviceMonitor.enabled=true"}, "metrics.serviceMonitor.enabled needs metrics.enabled"},
		{[]string{"namePrefix="}, "namePrefix must not be empty"},
	} {
		out, err := helmTemplate(t, tc.sets...)
		if err == nil {
			t.Errorf("--set %s: rendered, want an error %q; output:\n%.400s", strings.Join(tc.sets, ","), tc.want, out)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("--set %s: %v, want %q", strings.Join(tc.sets, ","), err, tc.want)
		}
	}
}

// field follows a path of map keys and list indexes through an object.
func field(o any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := o.(object)
			if !ok {
				return nil
			}
			o = m[k]
		case int:
			l, ok := o.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			o = l[k]
		}
	}
	return o
}

// container finds a container of a workload by name.
func container(o object, name string) object {
	cs, _ := field(o, "spec", "template", "spec", "containers").([]any)
	for _, c := range cs {
		if c, ok := c.(object); ok && c["name"] == name {
			return c
		}
	}
	return nil
}

func args(c object) []string {
	var out []string
	l, _ := c["args"].([]any)
	for _, a := range l {
		out = append(out, fmt.Sprint(a))
	}
	return out
}

// TestValues: values other than the defaults reach the objects they are
// for.
func TestValues(t *testing.T) {
	need(t)
	out, err := helmTemplate(t,
		"flavour=shared",
		"driverName=files.example.com",
		"namePrefix=files",
		"kubeletDir=/data/kubelet",
		"sharedPools.hostDir=/srv/share",
		"sharedPools.pools[0].name=fast",
		"sharedPools.pools[0].dir=/srv/share/fast",
		"sharedPools.pools[0].id=0f3c",
		"sharedPools.pools[0].capacity=2Ti",
		"image.tag=v9.9.9",
		"sidecars.provisioner.image.repository=mirror.example.com/csi-provisioner",
		"node.maxVolumesPerNode=64",
		"node.nodeSelector.disk=ssd",
		"controller.tolerations=null",
		"ephemeral.maxSize=2Gi",
		"ephemeral.pools={fast}",
		"ephemeral.allowThick=true",
		"metrics.serviceMonitor.enabled=true",
		"metrics.serviceMonitor.labels.release=prom",
		"storageClasses[0].name=fast-ext4",
		"storageClasses[0].fsType=ext4",
		"storageClasses[0].pool=fast",
		"storageClasses[0].default=true",
		"storageClasses[0].parameters.provisioning=thick",
		"storageClasses[0].allowVolumeExpansion=false",
		"volumeSnapshotClass.default=true",
	)
	if err != nil {
		t.Fatal(err)
	}
	objs := parse(t, out)
	get := func(key string) object {
		o, ok := objs[key]
		if !ok {
			var keys []string
			for k := range objs {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			t.Fatalf("no %s in %s", key, strings.Join(keys, ", "))
		}
		return o
	}
	check := func(what string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s = %#v, want %#v", what, got, want)
		}
	}

	get("CSIDriver//files.example.com")
	node := get("DaemonSet/spool-system/files-node")
	ctl := get("Deployment/spool-system/files-controller")
	pool := "--pool=fast=/srv/share/fast,capacity=2Ti,shared,id=0f3c"
	check("node spool args", args(container(node, "spool")), []string{
		"--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)", "--driver-name=files.example.com",
		pool, "--ephemeral-max-size=2Gi", "--ephemeral-pools=fast", "--ephemeral-allow-thick",
		"--max-volumes-per-node=64", "--metrics-address=[$(POD_IP)]:9809", "--v=2"})
	check("controller spool args", args(container(ctl, "spool")), []string{
		"--mode=controller", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)", "--driver-name=files.example.com",
		pool, "--metrics-address=[$(POD_IP)]:9809", "--v=2"})
	check("spool image", container(node, "spool")["image"], "ghcr.io/spool-csi/spool:v9.9.9")
	check("provisioner image", container(ctl, "csi-provisioner")["image"], "mirror.example.com/csi-provisioner:v6.4.0")
	check("registration path", args(container(node, "node-driver-registrar"))[1],
		"--kubelet-registration-path=/data/kubelet/plugins/files.example.com/csi.sock")
	check("socket dir", field(node, "spec", "template", "spec", "volumes", 0, "hostPath", "path"), "/data/kubelet/plugins/files.example.com")
	check("share volume", field(node, "spec", "template", "spec", "volumes", 4, "hostPath", "path"), "/srv/share")
	check("node selector", field(node, "spec", "template", "spec", "nodeSelector"), object{"disk": "ssd"})
	check("controller tolerations", field(ctl, "spec", "template", "spec", "tolerations"), nil)
	check("controller affinity key", field(ctl, "spec", "template", "spec", "affinity", "nodeAffinity",
		"requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms", 0, "matchExpressions", 0, "key"), "files.example.com/pool-fast")
	check("controller account", field(ctl, "spec", "template", "spec", "serviceAccountName"), "files-csi-provisioner")
	check("attacher binding subjects", field(get("ClusterRoleBinding//files-csi-attacher-role"), "subjects"), []any{
		object{"kind": "ServiceAccount", "name": "files-csi-attacher", "namespace": namespace},
		object{"kind": "ServiceAccount", "name": "files-csi-provisioner", "namespace": namespace}})

	sc := get("StorageClass//fast-ext4")
	check("class provisioner", sc["provisioner"], "files.example.com")
	check("class parameters", sc["parameters"], object{"csi.storage.k8s.io/fstype": "ext4", "pool": "fast", "provisioning": "thick"})
	check("class expansion", sc["allowVolumeExpansion"], false)
	check("default class", field(sc, "metadata", "annotations", "storageclass.kubernetes.io/is-default-class"), "true")
	vsc := get("VolumeSnapshotClass//spool-snapshots")
	check("snapshot class driver", vsc["driver"], "files.example.com")
	check("default snapshot class", field(vsc, "metadata", "annotations", "snapshot.storage.kubernetes.io/is-default-class"), "true")
	sm := get("ServiceMonitor/spool-system/files")
	check("ServiceMonitor labels", field(sm, "metadata", "labels", "release"), "prom")
	check("metrics Service port", field(get("Service/spool-system/files-metrics"), "spec", "ports", 0, "port"), 9809)
}

// valuePaths lists the leaves of values.yaml as dotted paths. A list is a
// leaf, and so are a container's resources and a sidecar's image
// ({repository, tag}).
func valuePaths(prefix string, v any, out *[]string) {
	m, ok := v.(object)
	leaf := strings.HasSuffix(prefix, ".resources") || prefix == "resources" || strings.HasSuffix(prefix, ".image")
	if !ok || len(m) == 0 || leaf {
		*out = append(*out, prefix)
		return
	}
	for k, sub := range m {
		p := k
		if prefix != "" {
			p = prefix + "." + k
		}
		valuePaths(p, sub, out)
	}
}

// TestReadmeDescribesEveryValue: each value of values.yaml is named in
// the chart's README (as `path`).
func TestReadmeDescribesEveryValue(t *testing.T) {
	root := repoRoot(t)
	raw, err := os.ReadFile(filepath.Join(root, "charts", "spool", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var values object
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "charts", "spool", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	valuePaths("", values, &paths)
	sort.Strings(paths)
	for _, p := range paths {
		if !bytes.Contains(readme, []byte("`"+p+"`")) {
			t.Errorf("charts/spool/README.md does not describe `%s`", p)
		}
	}
	t.Logf("%d values described", len(paths))
}
