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

func openPool(t *testing.T, dir string, capacity int64) *Pool {
	t.Helper()
	p, err := Open(Spec{Name: "test", Dir: dir, Capacity: capacity}, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func req(name string, n int64) CreateRequest {
	return CreateRequest{Name: name, CapacityBytes: n, Provisioning: Thin, AccessType: Mount, FSType: "ext4"}
}

func TestCreateGetDelete(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	v, created, err := p.CreateVolume(context.Background(), req("pvc-1", 64*size.MiB))
	if err != nil || !created {
		t.Fatalf("CreateVolume: %v, created=%t", err, created)
	}
	if !strings.HasPrefix(v.ID, "test:node-1:") {
		t.Fatalf("ID %q", v.ID)
	}
	img, _ := p.ImagePath(v.Token())
	fi, err := os.Stat(img)
	if err != nil || fi.Size() != 64*size.MiB {
		t.Fatalf("image: %v, %v", fi, err)
	}
	if p.AllocatedBytes(v.Token()) > size.MiB {
		t.Fatalf("thin image allocates %d bytes", p.AllocatedBytes(v.Token()))
	}
	again, created, err := p.CreateVolume(context.Background(), req("pvc-1", 64*size.MiB))
	if err != nil || created || again.ID != v.ID {
		t.Fatalf("second CreateVolume: %v created=%t id=%s", err, created, again.ID)
	}
	if got, err := p.Get(v.Token()); err != nil || got.Name != "pvc-1" {
		t.Fatalf("Get: %+v %v", got, err)
	}
	if err := p.DeleteVolume(v.Token()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(img)); !os.IsNotExist(err) {
		t.Fatalf("volume directory still there: %v", err)
	}
	if _, err := p.Get(v.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
	if err := p.DeleteVolume(v.Token()); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, trashDir)); len(entries) != 0 {
		t.Fatalf("trash not empty: %v", entries)
	}
}

func TestThickPreallocates(t *testing.T) {
	p := openPool(t, t.TempDir(), 0)
	r := req("thick", 8*size.MiB)
	r.Provisioning = Thick
	v, _, err := p.CreateVolume(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.AllocatedBytes(v.Token()); got < 8*size.MiB {
		t.Fatalf("thick image allocates %d bytes, want >= %d", got, 8*size.MiB)
	}
}

func TestCapacityCountsProvisionedBytes(t *testing.T) {
	p := openPool(t, t.TempDir(), 100*size.MiB)
	if _, _, err := p.CreateVolume(context.Background(), req("a", 60*size.MiB)); err != nil {
		t.Fatal(err)
	}
	c, err := p.Capacity()
	if err != nil {
		t.Fatal(err)
	}
	if c.Total != 100*size.MiB || c.Provisioned != 60*size.MiB || c.Available != 40*size.MiB {
		t.Fatalf("capacity %+v", c)
	}
	// The thin image holds no data, yet its full size is spoken for.
	_, _, err = p.CreateVolume(context.Background(), req("b", 41*size.MiB))
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("over-provisioning: %v, want ResourceExhausted", err)
	}
	if _, _, err := p.CreateVolume(context.Background(), req("b", 40*size.MiB)); err != nil {
		t.Fatalf("exact fit: %v", err)
	}
}

func TestConcurrentCreateSameName(t *testing.T) {
	p := openPool(t, t.TempDir(), 0)
	var wg sync.WaitGroup
	ids := make(chan string, 32)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, _, err := p.CreateVolume(context.Background(), req("same", size.MiB))
			if err == nil {
				ids <- v.ID
			} else if !errors.Is(err, ErrInProgress) {
				t.Errorf("CreateVolume: %v", err)
			}
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[string]bool{}
	for id := range ids {
		seen[id] = true
	}
	if len(seen) != 1 || len(p.List()) != 1 {
		t.Fatalf("got IDs %v and %d volumes, want exactly one", seen, len(p.List()))
	}
}

func TestReopenRecoversAndCleans(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	v, _, err := p.CreateVolume(context.Background(), req("keep", size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Update(v.Token(), func(v *Volume) error {
		v.Attachments = append(v.Attachments, Attachment{Node: "node-1", Generation: 1})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(Spec{Name: "test", Dir: dir}, "node-1"); err == nil {
		t.Fatal("a second Open of a locked pool succeeded")
	}
	p.Close()

	// What a crash leaves: a half-built volume and a half-deleted one.
	for _, d := range []string{filepath.Join(dir, tmpDir, "aaaaaaaaaaaaaaaaaaaaaaaa"), filepath.Join(dir, trashDir, "bbbbbbbbbbbbbbbbbbbbbbbb")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, imageFile), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A directory with unreadable metadata is reported, never deleted.
	corrupt := filepath.Join(dir, volumesDir, "cccccccccccccccccccccccc")
	if err := os.MkdirAll(corrupt, 0o750); err != nil {
		t.Fatal(err)
	}

	q := openPool(t, dir, 0)
	got, err := q.Get(v.Token())
	if err != nil || got.Name != "keep" || len(got.Attachments) != 1 {
		t.Fatalf("after reopen: %+v, %v", got, err)
	}
	for _, d := range []string{tmpDir, trashDir} {
		if entries, _ := os.ReadDir(filepath.Join(dir, d)); len(entries) != 0 {
			t.Errorf("%s not cleaned: %v", d, entries)
		}
	}
	if _, err := os.Stat(corrupt); err != nil {
		t.Errorf("corrupt volume directory was removed: %v", err)
	}
	if len(q.List()) != 1 {
		t.Errorf("List: %v", q.List())
	}
}

func TestIdentityMismatch(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	p.Close()
	if _, err := Open(Spec{Name: "other", Dir: dir}, "node-1"); err == nil || !strings.Contains(err.Error(), "belongs to pool") {
		t.Fatalf("opening a pool under another name: %v", err)
	}
}

func TestOpenExistingCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{filepath.Join(dir, "missing"), dir} {
		if _, err := Open(Spec{Name: "test", Dir: d, Existing: true}, "node-1"); err == nil || !strings.Contains(err.Error(), "not a Spool pool") {
			t.Fatalf("Open(Existing) of %s, which is no pool: %v", d, err)
		}
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Fatalf("a refused Open left %v (%v)", entries, err)
	}
	p := openPool(t, dir, 0)
	p.Close()
	p, err := Open(Spec{Name: "test", Dir: dir, Existing: true}, "node-1")
	if err != nil {
		t.Fatalf("Open(Existing) of a pool: %v", err)
	}
	p.Close()
	if _, err := Open(Spec{Name: "other", Dir: dir, Existing: true}, "node-1"); err == nil {
		t.Fatal("Open(Existing) under another pool name succeeded")
	}
}

func TestParseSpec(t *testing.T) {
	s, err := ParseSpec("fast=/var/lib/spool/fast,capacity=10Gi")
	if err != nil || s.Name != "fast" || s.Dir != "/var/lib/spool/fast" || s.Capacity != 10*size.GiB {
		t.Fatalf("ParseSpec: %+v %v", s, err)
	}
	for _, bad := range []string{"", "fast", "fast=", "fast=relative/dir", "Fast=/x", "fast=/x,capacity=", "fast=/x,capacity=-1", "fast=/x,capacity=0", "fast=/x,color=red", "../x=/y"} {
		if _, err := ParseSpec(bad); err == nil {
			t.Errorf("ParseSpec(%q) succeeded", bad)
		}
	}
}

func TestSpecsFlag(t *testing.T) {
	var s Specs
	for _, v := range []string{"a=/x", "b=/y,capacity=1Gi"} {
		if err := s.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Set("c=relative"); err == nil {
		t.Error("a relative pool directory was accepted")
	}
	if len(s) != 2 || s[1].Capacity != size.GiB || s.String() != "a=/x b=/y" {
		t.Fatalf("specs %+v (%s)", s, s.String())
	}
}

func TestIsImage(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	tok := "0123456789abcdef01234567"
	for path, want := range map[string]bool{
		filepath.Join(dir, "volumes", tok, "disk.img"):            true,
		filepath.Join(dir, "volumes", tok, "volume.json"):         false,
		filepath.Join(dir, ".tmp", tok, "disk.img"):               false,
		filepath.Join(dir, "volumes", "x", "disk.img"):            false,
		filepath.Join(dir, "volumes", tok, "..", tok, "disk.img"): true,
		"/elsewhere/volumes/" + tok + "/disk.img":                 false,
	} {
		if got := p.IsImage(path); got != want {
			t.Errorf("IsImage(%q) = %t, want %t", path, got, want)
		}
	}
}

func TestSnapshotsAndCopies(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 200*size.MiB)
	ctx := context.Background()
	v, _, err := p.CreateVolume(ctx, req("origin", 8*size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	img, _ := p.ImagePath(v.Token())
	if err := os.WriteFile(img, []byte("snapshot me"), 0o600); err != nil { // shrinks it; grow back below
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8*size.MiB); err != nil {
		t.Fatal(err)
	}
	s, created, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "snap", SourceToken: v.Token()})
	if err != nil || !created || s.SizeBytes != 8*size.MiB || s.SourceVolumeID != v.ID {
		t.Fatalf("CreateSnapshot: %+v %t %v", s, created, err)
	}
	again, created, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "snap", SourceToken: v.Token()})
	if err != nil || created || again.ID != s.ID {
		t.Fatalf("repeated CreateSnapshot: %+v %t %v", again, created, err)
	}
	fi, err := os.Stat(filepath.Join(dir, snapshotsDir, s.Token(), imageFile))
	if err != nil || fi.Mode().Perm() != 0o400 {
		t.Fatalf("snapshot image: %v %v", fi, err)
	}
	// Changing the origin does not change the snapshot.
	if err := os.WriteFile(img, []byte("changed!!!!"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := req("restored", 16*size.MiB)
	r.SourceKind, r.SourceToken = SourceSnapshot, s.Token()
	rv, _, err := p.CreateVolume(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	rimg, _ := p.ImagePath(rv.Token())
	data, _ := os.ReadFile(rimg)
	if int64(len(data)) != 16*size.MiB || string(data[:11]) != "snapshot me" || !rv.NewFilesystemID || rv.Source.ID != s.ID {
		t.Fatalf("restored volume: %d bytes, %q, %+v", len(data), data[:11], rv.Source)
	}
	small := req("too-small", 4*size.MiB)
	small.SourceKind, small.SourceToken = SourceSnapshot, s.Token()
	if _, _, err := p.CreateVolume(ctx, small); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("restoring into a smaller volume: %v, want OutOfRange", err)
	}

	// Reopening keeps snapshots; a group member whose group record is
	// missing (a crash during CreateVolumeGroupSnapshot) is removed.
	orphan, _, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "member", SourceToken: v.Token(), GroupID: "test:node-1:group-000000000000000000000000"})
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	q := openPool(t, dir, 200*size.MiB)
	if _, err := q.GetSnapshot(s.Token()); err != nil {
		t.Fatalf("snapshot lost on reopen: %v", err)
	}
	if _, err := q.GetSnapshot(orphan.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("orphaned group member survived reopen: %v", err)
	}
	if err := q.DeleteSnapshot(s.Token()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, snapshotsDir, s.Token())); !os.IsNotExist(err) {
		t.Fatalf("snapshot directory left after delete: %v", err)
	}
}

func TestGroups(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	ctx := context.Background()
	v, _, _ := p.CreateVolume(ctx, req("a", size.MiB))
	gid, _ := volid.New(volid.KindGroup, "test", "node-1")
	s, _, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "m", SourceToken: v.Token(), GroupID: gid.String()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateGroup(gid, "g", []string{s.ID}); err != nil {
		t.Fatal(err)
	}
	p.Close()
	p = openPool(t, dir, 0)
	g, ok := p.GetGroupByName("g")
	if !ok || len(g.SnapshotIDs) != 1 {
		t.Fatalf("group after reopen: %+v %t", g, ok)
	}
	if _, err := p.GetSnapshot(s.Token()); err != nil {
		t.Fatalf("member of a recorded group was removed: %v", err)
	}
	if err := p.DeleteGroup(gid.Token); err != nil {
		t.Fatal(err)
	}
	if _, err := p.GetSnapshot(s.Token()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("member survived its group: %v", err)
	}
}

func TestExpandAndProvisioning(t *testing.T) {
	p := openPool(t, t.TempDir(), 100*size.MiB)
	ctx := context.Background()
	v, _, err := p.CreateVolume(ctx, req("v", 40*size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.ExpandVolume(v.Token(), 101*size.MiB); !errors.Is(err, ErrExhausted) {
		t.Fatalf("growing past the pool: %v, want ResourceExhausted", err)
	}
	g, err := p.ExpandVolume(v.Token(), 60*size.MiB)
	if err != nil || g.CapacityBytes != 60*size.MiB {
		t.Fatalf("ExpandVolume: %+v %v", g, err)
	}
	img, _ := p.ImagePath(v.Token())
	if fi, _ := os.Stat(img); fi.Size() != 60*size.MiB {
		t.Fatalf("image is %d bytes after expansion", fi.Size())
	}
	if c, _ := p.Capacity(); c.Provisioned != 60*size.MiB {
		t.Fatalf("provisioned %d after expansion", c.Provisioned)
	}
	if _, err := p.SetProvisioning(v.Token(), Thick); err != nil {
		t.Fatal(err)
	}
	if a := p.AllocatedBytes(v.Token()); a < 60*size.MiB {
		t.Fatalf("thick volume allocates %d bytes", a)
	}
}
