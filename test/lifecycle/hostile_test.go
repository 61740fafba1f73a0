package lifecycle

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/cli"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

// treeDigest hashes every path, mode and file content under dir.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		line := p + " " + fi.Mode().String()
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			line += " " + hex.EncodeToString(sum[:])
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	sum := sha256.Sum256([]byte(strings.Join(lines, "\n")))
	return hex.EncodeToString(sum[:])
}

// plantSentinel makes a tree of files next to the pool in dir, where "../"
// from a volume's directory would lead, and returns its path.
func plantSentinel(t *testing.T, dir string) string {
	t.Helper()
	sentinel := filepath.Join(dir, "sentinel")
	for _, f := range []string{"a/secret", "b/c/data", "volumes/000000000000000000000000/disk.img"} {
		p := filepath.Join(sentinel, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("sentinel "+f), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return sentinel
}

// hostileIDs is the traversal corpus of IDs, built around a real volume ID
// so that some reach deep code.
func hostileIDs(volumeID, sentinel string) []string {
	prefix := volumeID[:len(volumeID)-24]
	return []string{
		"../sentinel", "../../sentinel/a/secret", sentinel, "/etc/passwd", ".", "..", "", "%2e%2e%2fsentinel",
		prefix + "../../../sentinel", prefix + "000000000000000000000000/../../sentinel", prefix + "snap-../../sentinel",
		"default:lifecycle-node:" + strings.Repeat("0", 23) + "\x00", "default:lifecycle-node:..%2f..%2fsentinel",
		"default:../../sentinel:000000000000000000000000", "../../sentinel:node:000000000000000000000000",
		strings.Repeat("A", 5000), "default:lifecycle-node:0000000000000000000000/0", "名前:ノード:000000000000000000000000",
		"a\nb", volumeID + "/..", volumeID + "\x00",
	}
}

// Hostile IDs, names and paths in every RPC field that carries one get
// InvalidArgument or NotFound (or the idempotent OK of a delete), and
// nothing outside the pool changes.
func TestHostileInput(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	// A real volume, so that IDs built from its parts reach deep code.
	v := e.publishNew(c, "real", 16<<20, csiclient.MountCap("ext4"), nil)
	sentinel := plantSentinel(t, e.dir)
	before := treeDigest(t, sentinel)
	poolBefore := treeDigest(t, pool.VolumesDir(filepath.Join(e.dir, "pool")))
	ids := hostileIDs(v.ID, sentinel)
	mc := csiclient.MountCap("ext4")
	ok := func(err error, allowOK bool) bool {
		switch status.Code(err) {
		case codes.InvalidArgument, codes.NotFound:
			return true
		case codes.OK:
			return allowOK
		}
		return false
	}
	check := func(what, in string, err error, allowOK bool) {
		t.Helper()
		if !ok(err, allowOK) {
			t.Errorf("%s(%q): %v, want InvalidArgument or NotFound", what, in, err)
		}
	}
	for _, id := range ids {
		_, err := e.c.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id})
		check("DeleteVolume", id, err, true)
		_, err = e.c.ControllerPublishVolume(c, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: mc})
		check("ControllerPublishVolume", id, err, false)
		_, err = e.c.ControllerUnpublishVolume(c, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node})
		check("ControllerUnpublishVolume", id, err, true)
		_, err = e.c.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{mc}})
		check("ValidateVolumeCapabilities", id, err, false)
		_, err = e.c.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}})
		check("ControllerExpandVolume", id, err, false)
		_, err = e.c.ControllerGetVolume(c, &csi.ControllerGetVolumeRequest{VolumeId: id})
		check("ControllerGetVolume", id, err, false)
		_, err = e.c.ControllerModifyVolume(c, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"provisioning": "thick"}})
		check("ControllerModifyVolume", id, err, false)
		_, err = e.c.ControllerGetVolumeHealth(c, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
		check("ControllerGetVolumeHealth", id, err, false)
		_, err = e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(e.dir, "hs"), VolumeCapability: mc, PublishContext: v.PublishContext})
		check("NodeStageVolume", id, err, false)
		_, err = e.c.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(e.dir, "hs")})
		check("NodeUnstageVolume", id, err, false)
		_, err = e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: v.Staging, TargetPath: filepath.Join(e.dir, "ht"), VolumeCapability: mc, PublishContext: v.PublishContext})
		check("NodePublishVolume", id, err, false)
		_, err = e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: filepath.Join(e.dir, "ht")})
		check("NodeUnpublishVolume", id, err, true) // a vanished ephemeral volume unpublishes fine
		_, err = e.c.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: v.Target})
		check("NodeGetVolumeStats", id, err, false)
		_, err = e.c.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: v.Target})
		check("NodeExpandVolume", id, err, false)
		_, err = e.c.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
		check("NodeGetVolumeHealth", id, err, false)
		_, err = e.c.CreateSnapshot(c, &csi.CreateSnapshotRequest{Name: "hostile", SourceVolumeId: id})
		check("CreateSnapshot", id, err, false)
		_, err = e.c.DeleteSnapshot(c, &csi.DeleteSnapshotRequest{SnapshotId: id})
		check("DeleteSnapshot", id, err, true)
		_, err = e.c.GetSnapshot(c, &csi.GetSnapshotRequest{SnapshotId: id})
		check("GetSnapshot", id, err, false)
		for _, src := range []*csi.VolumeContentSource{
			{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}},
			{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}},
		} {
			_, err = e.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: "hostile-copy", VolumeCapabilities: []*csi.VolumeCapability{mc}, VolumeContentSource: src})
			check("CreateVolume from", id, err, false)
		}
		// Ephemeral volume IDs come from the kubelet: hostile ones are refused.
		_, err = e.c.NodePublishVolume(c, ephemeralPublish(id, filepath.Join(e.dir, "he"), nil))
		if id != "" && isKubeletSafe(id) {
			_, _ = e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: filepath.Join(e.dir, "he")})
		} else {
			check("NodePublishVolume (ephemeral)", id, err, false)
		}
	}
	for _, p := range badPaths {
		_, err := e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: p, VolumeCapability: mc, PublishContext: v.PublishContext})
		check("NodeStageVolume staging path", p, err, false)
		_, err = e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: p, VolumeCapability: mc, PublishContext: v.PublishContext})
		check("NodePublishVolume target path", p, err, false)
		_, err = e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: p})
		check("NodeUnpublishVolume target path", p, err, false)
	}
	for _, prm := range []map[string]string{{"pool": "../sentinel"}, {"pool": sentinel}, {"provisioning": "../x"}, {"../x": "y"}} {
		_, err := e.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: "hostile-params", VolumeCapabilities: []*csi.VolumeCapability{mc}, Parameters: prm})
		check("CreateVolume parameters", prm[""], err, false)
	}
	for _, flags := range [][]string{{"ro,bind"}, {"remount"}, {"x-mount.mkdir=/tmp/x"}, {"defaults\x00"},
		{"journal_path=" + sentinel}, {"journal_dev=2049"}, {"logdev=/dev/loop0"}, {"device=/dev/loop0"},
		{"offset=0"}, {"uhelper=x"}, {"errors=panic"}, {"suid"}, {"dev"}, {"defaults"}, {"fscontext=system_u:object_r:t:s0"}} {
		_, err := e.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: "hostile-flags", VolumeCapabilities: []*csi.VolumeCapability{csiclient.MountCap("ext4", flags...)}})
		check("CreateVolume mount flags", strings.Join(flags, " "), err, false)
	}
	// Names are never path elements: a hostile name makes an ordinary volume.
	hv, err := e.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: "../../sentinel/a", VolumeCapabilities: []*csi.VolumeCapability{mc}, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: hv.GetVolume().GetVolumeId()}); err != nil {
		t.Fatal(err)
	}

	if after := treeDigest(t, sentinel); after != before {
		t.Fatal("the sentinel tree outside the pool changed")
	}
	if after := treeDigest(t, pool.VolumesDir(filepath.Join(e.dir, "pool"))); after != poolBefore {
		t.Fatal("the pool's volumes changed")
	}
	for _, p := range []string{"hs", "ht", "he"} {
		if _, err := os.Lstat(filepath.Join(e.dir, p)); err == nil && p != "he" {
			t.Errorf("a refused call left %s behind", p)
		}
	}
}

// badPaths are hostile staging, target and pool paths.
var badPaths = []string{"", "relative/path", "../sentinel", "sentinel/../..", "\x00", strings.Repeat("/x", 3000)}

// isKubeletSafe reports whether id would be accepted as an ephemeral volume
// ID (letters, digits, '.', '_', '-').
func isKubeletSafe(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i, r := range id {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || (i > 0 && strings.ContainsRune("._-", r))
		if !ok {
			return false
		}
	}
	return true
}

// The operator commands (`spool volume`) get the same corpus in every flag
// that names something and as pool directories, both for the pool the
// running driver serves (whose lock keeps them off it) and for a pool no
// driver serves. Every call fails without output, and nothing in the pools
// or next to them changes.
func TestHostileCLIInput(t *testing.T) {
	e := newEnv(t)
	v := e.publishNew(ctx(t), "real", 16<<20, csiclient.MountCap("ext4"), nil)
	sentinel := plantSentinel(t, e.dir)
	spare := filepath.Join(e.dir, "spare")
	p, err := pool.Open(pool.Spec{Name: "spare", Dir: spare}, node)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	digests := func() []string {
		return []string{treeDigest(t, sentinel), treeDigest(t, pool.VolumesDir(filepath.Join(e.dir, "pool"))), treeDigest(t, pool.VolumesDir(spare))}
	}
	before := digests()
	entries := func() []string {
		des, err := os.ReadDir(e.dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, de := range des {
			out = append(out, de.Name())
		}
		return out
	}
	entriesBefore := entries()

	refused := func(args ...string) {
		t.Helper()
		var out, errOut strings.Builder
		if code := cli.Volume(args, &out, &errOut); code == 0 || out.Len() != 0 || errOut.Len() == 0 {
			t.Errorf("spool volume %q: exit %d, stdout %q, stderr %q; want a refusal", args, code, out.String(), errOut.String())
		}
	}
	pools := []string{"default=" + filepath.Join(e.dir, "pool"), "spare=" + spare}
	corpus := append(hostileIDs(v.ID, sentinel), badPaths...)
	for _, poolFlag := range pools {
		for _, s := range corpus {
			for _, f := range []string{"--name", "--pv-name", "--storage-class", "--driver-name", "--node-id", "--size", "--fs", "--provisioning", "--reclaim-policy", "-o"} {
				if s == "" && (f == "--pv-name" || f == "--storage-class") {
					continue // the defaults: the volume's name, no class
				}
				args := []string{"create", "--pool", poolFlag, "--node-id", node, "--size", "1Mi", "--name", "ok"}
				refused(append(args, f, s)...)
			}
			refused("delete", "--pool", poolFlag, "--node-id", node, s)
			refused("list", "--pool", poolFlag, "--node-id", s)
		}
	}
	// Pool directories that lead to the sentinel, outside the pools, or to
	// the pool a driver serves.
	for _, d := range []string{
		sentinel, pool.VolumesDir(sentinel), filepath.Join(e.dir, "pool", "..", "sentinel"), pool.VolumesDir(spare),
		filepath.Join(e.dir, "missing"), "../sentinel", "sentinel", filepath.Join(e.dir, "pool"), "/etc", "/",
	} {
		for _, name := range []string{"default", "spare", "../sentinel"} {
			refused("create", "--pool", name+"="+d, "--node-id", node, "--size", "1Mi", "--name", "ok")
			refused("delete", "--pool", name+"="+d, "--node-id", node, v.ID)
		}
	}
	// The served volume cannot be deleted behind the driver's back.
	refused("delete", "--pool", pools[0], "--node-id", node, v.ID)

	if after := digests(); !slices.Equal(after, before) {
		t.Fatal("a refused command changed the sentinel or a pool's volumes")
	}
	if after := entries(); !slices.Equal(after, entriesBefore) {
		t.Fatalf("refused commands changed %s: %v, was %v", e.dir, after, entriesBefore)
	}
}
