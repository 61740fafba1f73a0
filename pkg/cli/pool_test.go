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
