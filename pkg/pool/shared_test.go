package pool

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

// openShared opens the shared pool "nfs" in dir as one more process would.
func openShared(t *testing.T, dir string, nodeOnly bool) *Pool {
	t.Helper()
	p, err := Open(Spec{Name: "nfs", Dir: dir, Shared: true, NodeOnly: nodeOnly}, "node-x")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func initShared(t *testing.T) (dir, id string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "share")
	id, err := Init("nfs", dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, id
}

func TestSharedPoolSpec(t *testing.T) {
	s, err := ParseSpec("nfs=/mnt/share/spool,shared,id=0123456789abcdef01234567,capacity=1Ti")
	if err != nil || !s.Shared || s.ID != "0123456789abcdef01234567" || s.Capacity != 1<<40 {
		t.Fatalf("ParseSpec: %+v, %v", s, err)
	}
	for _, bad := range []string{
		"nfs=/x,shared=yes", "nfs=/x,id=0123456789abcdef01234567", "nfs=/x,shared,id=../../etc",
		"nfs=/x,shared,id=", "nfs=/x,shared,id=0123456789ABCDEF01234567",
	} {
		if _, err := ParseSpec(bad); err == nil {
			t.Errorf("ParseSpec(%q) accepted", bad)
		}
	}
}

func TestSharedPoolInitAndIdentity(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "unmounted")
	if err := os.Mkdir(empty, 0o750); err != nil {
		t.Fatal(err)
	}
	// An unmounted share is an empty directory: never a new pool.
	if _, err := Open(Spec{Name: "nfs", Dir: empty, Shared: true}, "n1"); err == nil || !strings.Contains(err.Error(), "not a Spool pool") {
		t.Fatalf("Open of an uninitialised shared directory: %v", err)
	}
	if entries, _ := os.ReadDir(empty); len(entries) != 0 {
		t.Fatalf("Open created %d entries in an uninitialised directory", len(entries))
	}

	dir, id := initShared(t)
	if _, err := Init("nfs", dir); err == nil {
		t.Fatal("Init of an initialised pool succeeded")
	}
	if _, err := Open(Spec{Name: "nfs", Dir: dir, Shared: true, ID: strings.Repeat("0", 24)}, "n1"); err == nil || !strings.Contains(err.Error(), "right share") {
		t.Fatalf("Open with another pool ID: %v", err)
	}
	if _, err := Open(Spec{Name: "other", Dir: dir, Shared: true}, "n1"); err == nil {
		t.Fatal("Open under another pool name succeeded")
	}
	p, err := Open(Spec{Name: "nfs", Dir: dir, Shared: true, ID: id}, "n1")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if !p.Shared() || p.Node() != "" || p.ID() != id {
		t.Fatalf("shared pool: shared=%t node=%q id=%q", p.Shared(), p.Node(), p.ID())
	}
	if err := p.CheckIdentity(); err != nil {
		t.Fatal(err)
	}
	// Another share mounted over the directory: a new identity.
	other := filepath.Join(t.TempDir(), "other")
	if _, err := Init("nfs", other); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(filepath.Join(other, identityFile))
	if err := os.WriteFile(filepath.Join(dir, identityFile), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.CheckIdentity(); err == nil || !strings.Contains(err.Error(), "another share") {
		t.Fatalf("CheckIdentity after the share changed: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, identityFile)); err != nil {
		t.Fatal(err)
	}
	if err := p.CheckIdentity(); err == nil || !strings.Contains(err.Error(), "mounted") {
		t.Fatalf("CheckIdentity after the share went away: %v", err)
	}
}

func TestSharedPoolNodeRegistry(t *testing.T) {
	dir, _ := initShared(t)
	p := openShared(t, dir, true)
	if p.NodeRegistered("node-a") {
		t.Fatal("node-a registered before it said so")
	}
	if err := p.RegisterNode("node-a"); err != nil {
		t.Fatal(err)
	}
	if !openShared(t, dir, false).NodeRegistered("node-a") {
		t.Fatal("a controller does not see node-a's registration")
	}
	for _, bad := range []string{"../x", "", "a/b", ".."} {
		if p.RegisterNode(bad) == nil || p.NodeRegistered(bad) {
			t.Errorf("node ID %q accepted", bad)
		}
	}
}

func TestSharedPoolSeesOtherControllers(t *testing.T) {
	dir, _ := initShared(t)
	a, b := openShared(t, dir, false), openShared(t, dir, false)
	ctx := context.Background()
	v, created, err := a.CreateVolume(ctx, req("pvc-1", 64*size.MiB))
	if err != nil || !created {
		t.Fatalf("CreateVolume: %v %t", err, created)
	}
	if !strings.HasPrefix(v.ID, "nfs::") {
		t.Fatalf("shared volume ID %q", v.ID)
	}
	// b opened before the volume existed: it finds it by name and token.
	got, ok := b.GetByName("pvc-1")
	if !ok || got.ID != v.ID {
		t.Fatalf("GetByName on the other controller: %+v %t", got, ok)
	}
	if _, created, err := b.CreateVolume(ctx, req("pvc-1", 64*size.MiB)); err != nil || created {
		t.Fatalf("repeated CreateVolume on the other controller: created=%t err=%v", created, err)
	}
	if len(b.List()) != 1 {
		t.Fatalf("List on the other controller: %d volumes", len(b.List()))
	}
	c, err := b.Capacity()
	if err != nil || c.Provisioned != 64*size.MiB {
		t.Fatalf("Capacity on the other controller: %+v %v", c, err)
	}
	// An update by a is what b reads next.
	if _, err := a.Update(v.Token(), func(v *Volume) error {
		v.Attachments = append(v.Attachments, Attachment{Node: "n1", Generation: 1})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if l := b.List(); len(l) != 1 || len(l[0].Attachments) != 1 {
		t.Fatalf("List on the other controller after an attach: %+v", l)
	}
	if got, err := b.Get(v.Token()); err != nil || len(got.Attachments) != 1 {
		t.Fatalf("Get on the other controller after an attach: %+v %v", got, err)
	}
	// Attached: b may not delete it, even though its own index is old.
	if err := b.DeleteVolume(v.Token()); !errors.Is(err, ErrInUse) {
		t.Fatalf("DeleteVolume of an attached volume: %v", err)
	}
	if _, err := a.Update(v.Token(), func(v *Volume) error { v.Attachments = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteVolume(v.Token()); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Get(v.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get on the first controller after the other deleted it: %v", err)
	}
	if _, ok := a.GetByName("pvc-1"); ok {
		t.Fatal("deleted volume still found by name")
	}
	if len(a.List()) != 0 {
		t.Fatal("deleted volume still listed")
	}
}

// TestSharedPoolUpdateIsCompareAndSwap races attaches from two controllers
// (separate opens of the pool, as separate processes would be): exactly one
// may win, and no update is lost.
func TestSharedPoolUpdateIsCompareAndSwap(t *testing.T) {
	dir, _ := initShared(t)
	a, b := openShared(t, dir, false), openShared(t, dir, false)
	v, _, err := a.CreateVolume(context.Background(), req("pvc-1", 64*size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	errAttached := errors.New("attached elsewhere")
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := map[string]int{}
	for i := range 40 {
		p, node := a, "node-a"
		if i%2 == 1 {
			p, node = b, "node-b"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := p.Update(v.Token(), func(v *Volume) error {
				if len(v.Attachments) > 0 {
					return errAttached
				}
				v.Generation++
				v.Attachments = []Attachment{{Node: node, Generation: v.Generation}}
				return nil
			})
			if err == nil {
				mu.Lock()
				wins[node]++
				mu.Unlock()
			} else if !errors.Is(err, errAttached) {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if len(wins) != 1 || wins["node-a"]+wins["node-b"] != 1 {
		t.Fatalf("attach winners: %v, want exactly one", wins)
	}
	got, err := b.Get(v.Token())
	if err != nil || len(got.Attachments) != 1 || got.Generation != 1 {
		t.Fatalf("after the race: %+v %v", got, err)
	}

	// Counters survive a race of increments from both sides.
	for i := range 50 {
		p := a
		if i%2 == 1 {
			p = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.Update(v.Token(), func(v *Volume) error { v.Generation++; return nil }); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got, _ := a.Get(v.Token()); got.Generation != 51 {
		t.Fatalf("generation after 50 racing increments from 1: %d (updates lost)", got.Generation)
	}
}

// TestSharedPoolCreateRace creates one name from two controllers at once:
// both answer the same volume and only one exists on disk.
func TestSharedPoolCreateRace(t *testing.T) {
	dir, _ := initShared(t)
	a, b := openShared(t, dir, false), openShared(t, dir, false)
	raceCreates(t, dir, volumesDir, a, b, func(p *Pool, name string) (string, error) {
		v, _, err := p.CreateVolume(context.Background(), req(name, 64*size.MiB))
		return v.ID, err
	})
}

// raceCreates makes each of 10 names from both controllers at once: both
// must answer the same object, and sub must hold exactly 10 with nothing
// half-built left in .tmp.
func raceCreates(t *testing.T, dir, sub string, a, b *Pool, create func(p *Pool, name string) (id string, err error)) {
	t.Helper()
	for i := range 10 {
		name := "race-" + string(rune('a'+i))
		var wg sync.WaitGroup
		ids := make([]string, 2)
		for j, p := range []*Pool{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id, err := create(p, name)
				if err != nil {
					t.Error(err)
					return
				}
				ids[j] = id
			}()
		}
		wg.Wait()
		if ids[0] == "" || ids[0] != ids[1] {
			t.Fatalf("%s: the controllers answered %q and %q", name, ids[0], ids[1])
		}
	}
	entries, err := os.ReadDir(filepath.Join(dir, sub))
	if err != nil || len(entries) != 10 {
		t.Fatalf("%s on disk after 10 racing creates: %d (%v)", sub, len(entries), err)
	}
	if left, _ := os.ReadDir(filepath.Join(dir, tmpDir)); len(left) != 0 {
		t.Fatalf("%d half-built objects left in .tmp", len(left))
	}
}

// TestSharedPoolCleanup: only a controller that is alone cleans the scratch
// directories; node plugins never do.
func TestSharedPoolCleanup(t *testing.T) {
	dir, _ := initShared(t)
	leftover := filepath.Join(dir, tmpDir, "0123456789abcdef01234567")
	mk := func() {
		if err := os.MkdirAll(leftover, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	mk()
	openShared(t, dir, true).Close()
	if _, err := os.Stat(leftover); err != nil {
		t.Fatalf("a node plugin removed a controller's work in progress: %v", err)
	}
	first := openShared(t, dir, false)
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Fatalf("the only controller left a leftover: %v", err)
	}
	mk() // now "first" is building something
	second := openShared(t, dir, false)
	if _, err := os.Stat(leftover); err != nil {
		t.Fatalf("a second controller removed the first one's work in progress: %v", err)
	}
	second.Close()
	first.Close()
}

// TestSharedPoolSnapshotsSeenByOtherControllers: snapshots and group
// snapshots one controller takes or deletes are what another controller,
// opened before, sees next (a failover must not lose them).
func TestSharedPoolSnapshotsSeenByOtherControllers(t *testing.T) {
	dir, _ := initShared(t)
	a, b := openShared(t, dir, false), openShared(t, dir, false)
	ctx := context.Background()
	v, _, err := a.CreateVolume(ctx, req("pvc-1", size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	s, created, err := a.CreateSnapshot(ctx, SnapshotRequest{Name: "snap-1", SourceToken: v.Token()})
	if err != nil || !created {
		t.Fatalf("CreateSnapshot: %v %t", err, created)
	}
	if got, err := b.GetSnapshot(s.Token()); err != nil || got.ID != s.ID {
		t.Fatalf("GetSnapshot on the other controller: %+v %v", got, err)
	}
	if got, ok := b.GetSnapshotByName("snap-1"); !ok || got.ID != s.ID {
		t.Fatalf("GetSnapshotByName on the other controller: %+v %t", got, ok)
	}
	if l := b.ListSnapshots(); len(l) != 1 || l[0].ID != s.ID {
		t.Fatalf("ListSnapshots on the other controller: %+v", l)
	}
	if again, created, err := b.CreateSnapshot(ctx, SnapshotRequest{Name: "snap-1", SourceToken: v.Token()}); err != nil || created || again.ID != s.ID {
		t.Fatalf("repeated CreateSnapshot on the other controller: %+v %t %v", again, created, err)
	}
	r := req("restored", size.MiB)
	r.SourceKind, r.SourceToken = SourceSnapshot, s.Token()
	if _, _, err := b.CreateVolume(ctx, r); err != nil {
		t.Fatalf("restore on the other controller: %v", err)
	}
	if err := b.DeleteSnapshot(s.Token()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, snapshotsDir, s.Token())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("snapshot directory after DeleteSnapshot: %v", err)
	}
	if _, err := a.GetSnapshot(s.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetSnapshot on the first controller after the other deleted it: %v", err)
	}
	if _, ok := a.GetSnapshotByName("snap-1"); ok || len(a.ListSnapshots()) != 0 {
		t.Fatal("the first controller still lists the deleted snapshot")
	}
	if err := a.DeleteSnapshot(s.Token()); err != nil {
		t.Fatalf("DeleteSnapshot of a snapshot the other controller deleted: %v", err)
	}

	gid, err := volid.New(volid.KindGroup, "nfs", "")
	if err != nil {
		t.Fatal(err)
	}
	m, _, err := a.CreateSnapshot(ctx, SnapshotRequest{Name: gid.String() + "/m", SourceToken: v.Token(), GroupID: gid.String()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetSnapshot(m.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a member is visible before its group is recorded: %v", err)
	}
	// A failed group snapshot removes its members, which no index lists.
	orphan, _, err := a.CreateSnapshot(ctx, SnapshotRequest{Name: gid.String() + "/orphan", SourceToken: v.Token(), GroupID: gid.String()})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteSnapshot(orphan.Token()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, snapshotsDir, orphan.Token())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("member of an unrecorded group after DeleteSnapshot: %v", err)
	}
	if _, err := a.CreateGroup(gid, "group-1", []string{m.ID}); err != nil {
		t.Fatal(err)
	}
	if g, ok := b.GetGroupByName("group-1"); !ok || g.ID != gid.String() {
		t.Fatalf("GetGroupByName on the other controller: %+v %t", g, ok)
	}
	if _, err := b.GetSnapshot(m.Token()); err != nil {
		t.Fatalf("member on the other controller: %v", err)
	}
	other, _ := volid.New(volid.KindGroup, "nfs", "")
	if _, err := b.CreateGroup(other, "group-1", []string{m.ID}); !errors.Is(err, ErrInProgress) {
		t.Fatalf("second group of the same name: %v", err)
	}
	if err := b.DeleteGroup(gid.Token); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Join(groupsDir, gid.Token), filepath.Join(snapshotsDir, m.Token())} {
		if _, err := os.Stat(filepath.Join(dir, d)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s after DeleteGroup: %v", d, err)
		}
	}
	if _, ok := a.GetGroupByName("group-1"); ok {
		t.Fatal("the first controller still finds the deleted group")
	}
}

// TestSharedPoolSnapshotCreateRace: two controllers creating one snapshot
// name get the same snapshot, and one copy stays on disk.
func TestSharedPoolSnapshotCreateRace(t *testing.T) {
	dir, _ := initShared(t)
	a, b := openShared(t, dir, false), openShared(t, dir, false)
	v, _, err := a.CreateVolume(context.Background(), req("pvc-1", size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	raceCreates(t, dir, snapshotsDir, a, b, func(p *Pool, name string) (string, error) {
		s, _, err := p.CreateSnapshot(context.Background(), SnapshotRequest{Name: name, SourceToken: v.Token()})
		return s.ID, err
	})
}
