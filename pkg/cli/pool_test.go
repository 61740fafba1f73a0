package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spool-csi/spool/pkg/pool"
)

func TestPoolInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "share")
	var out, errb bytes.Buffer
	if code := Pool([]string{"init", "nfs=" + dir}, &out, &errb); code != exitOK {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	id := strings.TrimSpace(out.String())
	p, err := pool.Open(pool.Spec{Name: "nfs", Dir: dir, Shared: true, ID: id}, "n1")
	if err != nil {
		t.Fatalf("the printed ID does not open the pool: %v", err)
	}
	p.Close()
	// Twice is refused, and leaves the pool as it was.
	before, _ := os.ReadFile(filepath.Join(dir, "spool-pool.json"))
	if code := Pool([]string{"init", "nfs=" + dir}, &out, &errb); code != exitError {
		t.Fatalf("second init: exit %d", code)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "spool-pool.json"))
	if !bytes.Equal(before, after) {
		t.Fatal("a refused init changed the identity")
	}
	for _, args := range [][]string{nil, {"init"}, {"init", "nfs"}, {"init", "NFS=/x"}, {"init", "nfs=relative"}, {"init", "nfs=/x,shared"}, {"frob"}, {"init", "a=/x", "b=/y"}} {
		if code := Pool(args, &out, &errb); code != exitUsage {
			t.Errorf("spool pool %q: exit %d, want %d", args, code, exitUsage)
		}
	}
}

// TestVolumesOfASharedPool: the volume commands work on a shared pool,
// whose handles name no node.
func TestVolumesOfASharedPool(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "share")
	var out, errb bytes.Buffer
	if code := Pool([]string{"init", "nfs=" + dir}, &out, &errb); code != exitOK {
		t.Fatalf("pool init: exit %d: %s", code, errb.String())
	}
	common := []string{"--pool", "nfs=" + dir + ",shared", "--node-id", testNode}
	r := mustRun(t, 0, append([]string{"create", "--name", "pre", "--size", "1Mi", "--fs", "ext4"}, common...)...)
	if !strings.Contains(r.stdout, "spool.csi.dev/pool-nfs") {
		t.Errorf("the PV of a shared volume does not name the pool's topology:\n%s", r.stdout)
	}
	// Its volumes name no node, so they do not make --node-id look wrong:
	// a second create in it, and one in a local pool beside it, work.
	second := strings.TrimSpace(mustRun(t, 0, append([]string{"create", "--name", "pre-2", "--size", "1Mi", "-o", "handle"}, common...)...).stdout)
	local := newPool(t)
	mustRun(t, 0, "create", "--pool", "default="+local, "--pool", "nfs="+dir+",shared", "--node-id", testNode, "--name", "beside", "--size", "1Mi")
	mustRun(t, 0, append([]string{"delete"}, append(common, second)...)...)
	h := strings.TrimSpace(mustRun(t, 0, append([]string{"list", "-o", "handle"}, common...)...).stdout)
	if !strings.HasPrefix(h, "nfs::") {
		t.Fatalf("handle %q", h)
	}
	// Declared as a local pool, the shared volume is not this command's.
	mustRun(t, exitUsage, "delete", "--pool", "nfs="+dir, "--node-id", testNode, h)
	mustRun(t, 0, append([]string{"delete"}, append(common, h)...)...)
	if dirs := volumeDirs(t, dir); len(dirs) != 0 {
		t.Fatalf("volume directories after delete: %v", dirs)
	}
}
