package pool

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/size"
)

// Snapshots count against the pool's capacity: a pool that promised its
// thick volumes every byte refuses a snapshot it cannot hold, instead of
// letting copy-on-write (or the copy itself) fill it (issue 19, class 5).
func TestSnapshotsCountAgainstCapacity(t *testing.T) {
	ctx := context.Background()
	p := openPool(t, t.TempDir(), 100*size.MiB)
	r := req("thick", 40*size.MiB)
	r.Provisioning = Thick
	v, _, err := p.CreateVolume(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	// A tenant filled the volume (unwritten preallocated blocks read as
	// holes, and a copy skips them).
	f, err := p.OpenImage(v.Token(), unix.O_RDWR)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(bytes.Repeat([]byte("data"), int(10*size.MiB))); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	before, err := p.Capacity()
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "s1", SourceToken: v.Token()})
	if err != nil {
		t.Fatal(err)
	}
	after, err := p.Capacity()
	if err != nil {
		t.Fatal(err)
	}
	if after.Snapshots < 40*size.MiB || before.Available-after.Available < 40*size.MiB {
		t.Fatalf("a snapshot of a 40 MiB thick volume: snapshots %d, available %d -> %d", after.Snapshots, before.Available, after.Available)
	}
	// 100 MiB: 40 the volume, 40 the first snapshot; a second does not fit.
	_, _, err = p.CreateSnapshot(ctx, SnapshotRequest{Name: "s2", SourceToken: v.Token()})
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("second snapshot: %v, want ResourceExhausted", err)
	}
	// Nor does a volume that needs what the snapshot holds.
	if _, _, err := p.CreateVolume(ctx, req("more", 40*size.MiB)); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a volume beyond what the snapshot left: %v, want ResourceExhausted", err)
	}
	// Deleting the snapshot gives the room back, also after a reopen.
	if err := p.DeleteSnapshot(s.Token()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.CreateSnapshot(ctx, SnapshotRequest{Name: "s3", SourceToken: v.Token()}); err != nil {
		t.Fatalf("snapshot after deleting the first: %v", err)
	}
	dir := p.Root()
	p.Close()
	q := openPool(t, dir, 100*size.MiB)
	c, err := q.Capacity()
	if err != nil {
		t.Fatal(err)
	}
	if c.Snapshots < 40*size.MiB || c.Available > 20*size.MiB {
		t.Fatalf("after a reopen: snapshots %d, available %d", c.Snapshots, c.Available)
	}
}

// A crash between growing an image and recording its size leaves an image
// larger than its metadata: the next start records it, and a later
// expansion to a size in between is not an Internal error forever.
func TestInterruptedExpansionRepairedAtStart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := openPool(t, dir, 0)
	v, _, err := p.CreateVolume(ctx, req("grown", 64*size.MiB))
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	img := filepath.Join(dir, volumesDir, v.Token(), imageFile)
	if err := os.Truncate(img, 128*size.MiB); err != nil {
		t.Fatal(err)
	}
	q := openPool(t, dir, 0)
	got, err := q.Get(v.Token())
	if err != nil || got.CapacityBytes != 128*size.MiB {
		t.Fatalf("after the restart: %d bytes recorded, %v; want the image's 128 MiB", got.CapacityBytes, err)
	}
	if _, err := q.ExpandVolume(v.Token(), 96*size.MiB); err != nil {
		t.Fatalf("the CO's retry of the expansion: %v", err)
	}
}
