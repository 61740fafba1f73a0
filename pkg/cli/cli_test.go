package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

const testNode = "worker-1"

// newPool initialises a pool as the driver's first start does and returns
// its directory.
func newPool(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pool")
	p, err := pool.Open(pool.Spec{Name: "default", Dir: dir}, testNode)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	return dir
}

// result is one run of `spool volume ...`.
type result struct {
	code           int
	stdout, stderr string
}

func run(args ...string) result {
	var out, errOut bytes.Buffer
	code := Volume(args, &out, &errOut)
	return result{code, out.String(), errOut.String()}
}

// mustRun runs the command and fails the test unless it exits with want.
func mustRun(t *testing.T, want int, args ...string) result {
	t.Helper()
	r := run(args...)
	if r.code != want {
		t.Fatalf("spool volume %q: exit %d, want %d\nstdout: %s\nstderr: %s", args, r.code, want, r.stdout, r.stderr)
	}
	return r
}

// createArgs are the arguments of a create on the pool in dir.
func createArgs(dir string, extra ...string) []string {
	return append([]string{"create", "--pool", "default=" + dir, "--node-id", testNode}, extra...)
}

// volumeDirs lists the volume directories of a pool.
func volumeDirs(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(pool.VolumesDir(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// readMeta reads the volume.json of the volume with this handle.
func readMeta(t *testing.T, dir, handle string) pool.Volume {
	t.Helper()
	id, err := volid.ParseKind(handle, volid.KindVolume)
	if err != nil {
		t.Fatalf("handle %q: %v", handle, err)
	}
	data, err := os.ReadFile(filepath.Join(pool.VolumeDir(dir, id.Token), pool.MetadataName))
	if err != nil {
		t.Fatal(err)
	}
	var v pool.Volume
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestCreatePrintsManifest(t *testing.T) {
	dir := newPool(t)
	r := mustRun(t, 0, createArgs(dir, "--size", "1Gi", "--name", "data-0")...)

	// The handle: first line, a YAML comment.
	first, _, _ := strings.Cut(r.stdout, "\n")
	handle := strings.Trim(strings.TrimPrefix(first, "# volumeHandle: "), `"`)
	id, err := volid.ParseKind(handle, volid.KindVolume)
	if err != nil || id.Pool != "default" || id.Node != testNode {
		t.Fatalf("handle %q: %+v, %v", handle, id, err)
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 1 || dirs[0] != id.Token {
		t.Fatalf("volume directories %v, want [%s]", dirs, id.Token)
	}
	fi, err := os.Stat(filepath.Join(pool.VolumeDir(dir, id.Token), pool.ImageName))
	if err != nil || fi.Size() != size.GiB {
		t.Fatalf("image: %v, %v; want %d bytes", fi, err, size.GiB)
	}
	v := readMeta(t, dir, handle)
	if v.ID != handle || v.Name != "data-0" || v.CapacityBytes != size.GiB || v.Provisioning != pool.Thin ||
		v.AccessType != pool.Mount || v.FSType != "ext4" || len(v.Attachments) != 0 || v.Source != nil {
		t.Fatalf("volume.json: %+v", v)
	}

	var pv map[string]any
	if err := yaml.Unmarshal([]byte(r.stdout), &pv); err != nil {
		t.Fatalf("the manifest is not YAML: %v\n%s", err, r.stdout)
	}
	want := map[string]any{
		"apiVersion": "v1", "kind": "PersistentVolume",
		"metadata": map[string]any{"name": "data-0"},
		"spec": map[string]any{
			"capacity":                      map[string]any{"storage": "1Gi"},
			"volumeMode":                    "Filesystem",
			"accessModes":                   []any{"ReadWriteOnce"},
			"persistentVolumeReclaimPolicy": "Retain",
			"storageClassName":              "",
			"csi": map[string]any{
				"driver": driver.DefaultDriverName, "volumeHandle": handle, "fsType": "ext4",
				"volumeAttributes": map[string]any{"pool": "default", "provisioning": "thin"},
			},
			"nodeAffinity": map[string]any{"required": map[string]any{"nodeSelectorTerms": []any{
				map[string]any{"matchExpressions": []any{map[string]any{
					"key": driver.TopologyKey(driver.DefaultDriverName), "operator": "In", "values": []any{testNode},
				}}},
			}}},
		},
	}
	if !reflect.DeepEqual(pv, want) {
		t.Fatalf("manifest:\n%s\nparsed %#v\nwant %#v", r.stdout, pv, want)
	}

	// Again: the same volume, nothing new on disk.
	again := mustRun(t, 0, createArgs(dir, "--size", "1Gi", "--name", "data-0")...)
	if again.stdout != r.stdout {
		t.Fatalf("a repeated create printed\n%s\nthe first\n%s", again.stdout, r.stdout)
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 1 {
		t.Fatalf("a repeated create made another volume: %v", dirs)
	}
	// -o handle prints the handle alone; a smaller size is satisfied by the
	// existing volume, as CreateVolume's capacity range is.
	h := mustRun(t, 0, createArgs(dir, "--size", "512Mi", "--name", "data-0", "-o", "handle")...)
	if h.stdout != handle+"\n" {
		t.Fatalf("-o handle printed %q, want %q", h.stdout, handle+"\n")
	}
	if !strings.Contains(h.stderr, "already exists") {
		t.Errorf("no note that the existing volume is larger: %q", h.stderr)
	}
}

func TestCreateConflicts(t *testing.T) {
	dir := newPool(t)
	mustRun(t, 0, createArgs(dir, "--size", "64Mi", "--name", "db")...)
	for _, extra := range [][]string{
		{"--size", "128Mi"},
		{"--size", "64Mi", "--fs", "btrfs"},
		{"--size", "64Mi", "--fs", "block"},
		{"--size", "64Mi", "--provisioning", "thick"},
	} {
		r := mustRun(t, 1, createArgs(dir, append(extra, "--name", "db")...)...)
		if !strings.Contains(r.stderr, `volume "db" exists with`) || r.stdout != "" {
			t.Errorf("%v: stdout %q, stderr %q", extra, r.stdout, r.stderr)
		}
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 1 {
		t.Fatalf("conflicting creates made volumes: %v", dirs)
	}
}

func TestCreateBlockJSON(t *testing.T) {
	dir := newPool(t)
	r := mustRun(t, 0, createArgs(dir, "--size", "10M", "--pv-name", "raw-1", "--fs", "block", "--provisioning", "thick",
		"--reclaim-policy", "Delete", "--storage-class", "local-block", "--driver-name", "spool.example.com", "-o", "json")...)
	var out createResult
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("-o json: %v\n%s", err, r.stdout)
	}
	spec := out.PersistentVolume.Spec
	switch {
	case out.Name != "raw-1" || out.PersistentVolume.Metadata.Name != "raw-1":
		t.Errorf("names: %+v", out)
	case out.CapacityBytes != 10*size.MiB || spec.Capacity["storage"] != "10Mi":
		t.Errorf("10M is not rounded up to 10Mi: %+v", out)
	case spec.VolumeMode != "Block" || spec.CSI.FSType != "" || out.FSType != "":
		t.Errorf("block volume: %+v", spec)
	case spec.PersistentVolumeReclaimPolicy != "Delete" || out.PersistentVolume.Metadata.Annotations[annProvisionedBy] != "spool.example.com":
		t.Errorf("Delete policy without the provisioned-by annotation: %+v", out.PersistentVolume.Metadata)
	case spec.StorageClassName != "local-block" || spec.CSI.Driver != "spool.example.com" || spec.CSI.VolumeHandle != out.VolumeHandle:
		t.Errorf("spec %+v", spec)
	case spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Key != "spool.example.com/node":
		t.Errorf("affinity %+v", spec.NodeAffinity)
	}
	if !strings.Contains(r.stderr, "rounded up") {
		t.Errorf("no note that the size was rounded: %q", r.stderr)
	}
	v := readMeta(t, dir, out.VolumeHandle)
	if v.AccessType != pool.Block || v.FSType != "" || v.Provisioning != pool.Thick || v.Name != "raw-1" {
		t.Fatalf("volume.json %+v", v)
	}
	// The same manifest as YAML.
	y := mustRun(t, 0, createArgs(dir, "--size", "10M", "--pv-name", "raw-1", "--fs", "block", "--provisioning", "thick",
		"--reclaim-policy", "Delete", "--storage-class", "local-block", "--driver-name", "spool.example.com")...)
	var fromYAML, fromJSON any
	if err := yaml.Unmarshal([]byte(y.stdout), &fromYAML); err != nil {
		t.Fatal(err)
	}
	pvJSON, _ := json.Marshal(out.PersistentVolume)
	if err := yaml.Unmarshal(pvJSON, &fromJSON); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromYAML, fromJSON) {
		t.Fatalf("YAML and JSON manifests differ:\n%s\n%s", y.stdout, pvJSON)
	}
}

func TestCreateXFSIsRoundedUp(t *testing.T) {
	dir := newPool(t)
	r := mustRun(t, 0, createArgs(dir, "--size", "10Mi", "--name", "small", "--fs", "xfs", "-o", "handle")...)
	if v := readMeta(t, dir, strings.TrimSpace(r.stdout)); v.CapacityBytes != 300*size.MiB || v.FSType != "xfs" {
		t.Fatalf("xfs volume of 10Mi: %+v", v)
	}
}

func TestCreateRefusesWhatThePoolCannotHold(t *testing.T) {
	dir := newPool(t)
	args := func(name, n string) []string {
		return []string{"create", "--pool", "default=" + dir + ",capacity=100Mi", "--node-id", testNode, "--size", n, "--name", name}
	}
	r := mustRun(t, 1, args("big", "101Mi")...)
	if !strings.Contains(r.stderr, "cannot hold") {
		t.Errorf("stderr %q", r.stderr)
	}
	mustRun(t, 0, args("a", "60Mi")...)
	mustRun(t, 1, args("b", "60Mi")...) // provisioned bytes count, not allocated ones
	mustRun(t, 1, args("huge", "8000Pi")...)
	if dirs := volumeDirs(t, dir); len(dirs) != 1 {
		t.Fatalf("refused creates left volumes: %v", dirs)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, ".tmp")); len(entries) != 0 {
		t.Fatalf("refused creates left %v in .tmp", entries)
	}
}

func TestCreateRefusesAnotherNode(t *testing.T) {
	dir := newPool(t)
	mustRun(t, 0, createArgs(dir, "--size", "1Mi", "--name", "a")...)
	r := mustRun(t, 1, "create", "--pool", "default="+dir, "--node-id", "worker-2", "--size", "1Mi", "--name", "b")
	if !strings.Contains(r.stderr, "holds volumes of node "+testNode) {
		t.Errorf("stderr %q", r.stderr)
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 1 {
		t.Fatalf("volumes %v", dirs)
	}
}

// A running driver holds the pool's lock: the command must not work behind
// its back.
func TestCreateRefusesAPoolInUse(t *testing.T) {
	dir := newPool(t)
	p, err := pool.Open(pool.Spec{Name: "default", Dir: dir}, testNode)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	r := mustRun(t, 1, createArgs(dir, "--size", "1Mi", "--name", "a")...)
	if !strings.Contains(r.stderr, "--endpoint") {
		t.Errorf("stderr %q", r.stderr)
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 0 {
		t.Fatalf("volumes %v", dirs)
	}
}

// hostileStrings are traversal and injection attempts for every flag that
// names something.
var hostileStrings = []string{
	"../x", "../../etc/passwd", "/etc/passwd", "/", ".", "..", "x/../y", "a/b", "a\x00b", "\x00", "a\nb: c",
	"\"quoted\"", "x: y", "- item", "#comment", "*alias", "{}", " lead", "trail ", "%2e%2e%2fx",
	"名前", strings.Repeat("a", 254), strings.Repeat("a.", 200) + "a", "-leading-dash", "trailing-dash-",
}

// Hostile input in any flag is refused before anything on disk changes; in
// particular no name or path leads outside the pool.
func TestHostileInputCreatesNothing(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "pool")
	p, err := pool.Open(pool.Spec{Name: "default", Dir: dir}, testNode)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	notPool := filepath.Join(base, "not-a-pool")
	if err := os.Mkdir(notPool, 0o750); err != nil {
		t.Fatal(err)
	}
	before := listTree(t, base)

	good := map[string]string{"--size": "1Mi", "--name": "ok", "--pv-name": "ok", "--storage-class": "sc", "--driver-name": "spool.csi.dev",
		"--node-id": testNode, "--fs": "ext4", "--provisioning": "thin", "--reclaim-policy": "Retain", "-o": "yaml"}
	try := func(want int, flag, value string) {
		t.Helper()
		args := []string{"create"}
		if flag != "--pool" {
			args = append(args, "--pool", "default="+dir)
		}
		for k, v := range good {
			if k != flag {
				args = append(args, k, v)
			}
		}
		args = append(args, flag, value)
		if r := run(args...); r.code != want || r.stdout != "" {
			t.Errorf("%s %q: exit %d (want %d), stdout %q, stderr %q", flag, value, r.code, want, r.stdout, r.stderr)
		}
	}
	for _, s := range hostileStrings {
		for _, f := range []string{"--name", "--pv-name", "--storage-class", "--driver-name", "--node-id", "--fs", "--provisioning", "--reclaim-policy", "-o", "--size"} {
			try(2, f, s)
		}
		if filepath.IsAbs(s) {
			try(1, "--pool", "default="+s) // well-formed, but no pool
		} else {
			try(2, "--pool", "default="+s)
		}
		try(2, "--pool", s+"="+dir)
		try(2, "--pool", "default="+dir+","+s)
	}
	for _, f := range []string{"--name", "--pv-name", "--storage-class"} {
		try(2, f, "UPPER") // Kubernetes object names are lowercase
	}
	for _, s := range []string{"-1", "0", "1e9", "1.5Gi", "0x10", "+1Gi", "1 Gi", "1gi", "99999999999999999999", "9223372036854775807Ki", ""} {
		try(2, "--size", s)
	}
	// Absolute directories that are no pool (or lead out of one) are refused
	// and nothing is created in or under them.
	for _, d := range []string{notPool, filepath.Join(base, "missing"), pool.VolumesDir(dir), dir + "/../not-a-pool", filepath.Join(dir, ".."), "/etc", "/proc/self"} {
		try(1, "--pool", "default="+d)
	}
	// A pool directory under another pool name is refused: volume IDs name
	// their pool.
	try(1, "--pool", "other="+dir)
	if after := listTree(t, base); !reflect.DeepEqual(after, before) {
		t.Fatalf("refused commands changed the tree:\nbefore %v\nafter  %v", before, after)
	}
}

// listTree lists every path under dir except the pool's lock file, which
// refused commands may open.
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		out = append(out, strings.TrimPrefix(p, dir)+" "+fi.Mode().String())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestUsage(t *testing.T) {
	dir := newPool(t)
	for _, tc := range []struct {
		want int
		args []string
		msg  string
	}{
		{2, nil, "Usage"},
		{2, []string{"frobnicate"}, "unknown command"},
		{0, []string{"--help"}, ""},
		{0, []string{"create", "-h"}, "Usage: spool volume create"},
		{2, []string{"create", "--bogus"}, "flag provided but not defined"},
		{2, createArgs(dir, "--name", "a"), "--size is required"},
		{2, createArgs(dir, "--size", "1Mi"), "--name (or --pv-name) is required"},
		{2, createArgs(dir, "--size", "1Mi", "--name", "a", "extra"), "unexpected argument"},
		{2, []string{"create", "--pool", "default=" + dir, "--size", "1Mi", "--name", "a"}, "--node-id is required"},
		{2, []string{"create", "--node-id", testNode, "--size", "1Mi", "--name", "a"}, "--pool NAME=DIR is required"},
		{2, createArgs(dir, "--pool", "default="+dir, "--size", "1Mi", "--name", "a"), "given twice"},
		{2, []string{"delete", "--pool", "default=" + dir, "--node-id", testNode}, "at least one volume handle"},
		{2, []string{"list", "--pool", "default=" + dir, "--node-id", testNode, "-o", "yaml"}, "--output"},
	} {
		r := run(tc.args...)
		if r.code != tc.want || !strings.Contains(r.stdout+r.stderr, tc.msg) {
			t.Errorf("%q: exit %d (want %d), stdout %q, stderr %q (want %q)", tc.args, r.code, tc.want, r.stdout, r.stderr, tc.msg)
		}
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 0 {
		t.Fatalf("usage errors made volumes: %v", dirs)
	}
}

func TestListAndDelete(t *testing.T) {
	dir := newPool(t)
	common := []string{"--pool", "default=" + dir, "--node-id", testNode}
	a := strings.TrimSpace(mustRun(t, 0, createArgs(dir, "--size", "1Mi", "--name", "a", "-o", "handle")...).stdout)
	b := strings.TrimSpace(mustRun(t, 0, createArgs(dir, "--size", "2Mi", "--name", "b", "-o", "handle", "--provisioning", "thick")...).stdout)

	table := mustRun(t, 0, append([]string{"list"}, common...)...).stdout
	for _, want := range []string{"VOLUME HANDLE", a, b, "2Mi", "thick"} {
		if !strings.Contains(table, want) {
			t.Errorf("list does not show %q:\n%s", want, table)
		}
	}
	var entries []listEntry
	if err := json.Unmarshal([]byte(mustRun(t, 0, append([]string{"list", "-o", "json"}, common...)...).stdout), &entries); err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Fatalf("list -o json: %+v", entries)
	}
	for _, e := range entries {
		if e.VolumeHandle == b && (e.CapacityBytes != 2*size.MiB || e.Attributes["provisioning"] != "thick") {
			t.Errorf("entry %+v", e)
		}
	}

	del := func(want int, extra ...string) result {
		t.Helper()
		return mustRun(t, want, append(append([]string{"delete"}, common...), extra...)...)
	}
	if r := del(0, a); r.stdout != "deleted "+a+"\n" {
		t.Errorf("delete printed %q", r.stdout)
	}
	if r := del(1, a); !strings.Contains(r.stderr, "does not exist") {
		t.Errorf("deleting a deleted volume: %q", r.stderr)
	}
	del(0, "--ignore-not-found", a)
	for _, bad := range append([]string{"default:worker-2:" + strings.Repeat("0", 24), "other:" + testNode + ":" + strings.Repeat("0", 24)}, hostileStrings...) {
		del(2, bad)
	}
	if got := strings.TrimSpace(mustRun(t, 0, append([]string{"list", "-o", "handle"}, common...)...).stdout); got != b {
		t.Fatalf("after deleting %s, list shows %q", a, got)
	}
	if dirs := volumeDirs(t, dir); len(dirs) != 1 {
		t.Fatalf("volume directories %v", dirs)
	}
}

// An encrypted pre-provisioned volume: the PV names its key Secret, the
// metadata holds a salt and no key, the listing shows the encryption.
func TestCreateEncrypted(t *testing.T) {
	dir := newPool(t)
	r := mustRun(t, 0, createArgs(dir, "--size", "64Mi", "--name", "secret-data", "--encryption-secret", "apps/volume-keys")...)
	for _, want := range []string{"nodeStageSecretRef:\n      name: \"volume-keys\"\n      namespace: \"apps\"", `"encryption": "fscrypt"`} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("manifest lacks %q:\n%s", want, r.stdout)
		}
	}
	first, _, _ := strings.Cut(r.stdout, "\n")
	handle := strings.Trim(strings.TrimPrefix(first, "# volumeHandle: "), `"`)
	if v := readMeta(t, dir, handle); v.Encryption == nil || v.Encryption.Mode != pool.EncryptionFscrypt || len(v.Encryption.Salt) != 64 {
		t.Fatalf("metadata encryption %+v", v.Encryption)
	}
	table := mustRun(t, 0, "list", "--pool", "default="+dir, "--node-id", testNode).stdout
	if !strings.Contains(table, "ENCRYPTION") || !strings.Contains(table, "fscrypt") {
		t.Errorf("list does not show the encryption:\n%s", table)
	}
	for _, bad := range [][]string{
		{"--size", "64Mi", "--name", "x1", "--encryption-secret", "no-namespace"},
		{"--size", "64Mi", "--name", "x2", "--encryption-secret", "apps/Bad_Name"},
		{"--size", "300Mi", "--name", "x3", "--encryption-secret", "apps/k", "--fs", "xfs"},
		{"--size", "64Mi", "--name", "x4", "--encryption-secret", "apps/k", "--fs", "block"},
	} {
		if r := run(createArgs(dir, bad...)...); r.code == 0 {
			t.Errorf("%v: accepted", bad)
		}
	}
	if n := len(volumeDirs(t, dir)); n != 1 {
		t.Fatalf("%d volumes after refused creates, want 1", n)
	}
}
