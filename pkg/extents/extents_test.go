package extents

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/loop"
)

const mib = 1 << 20

// collect runs a range producer and returns what it emitted, checking the
// spec's rules for a sequence of BlockMetadata: lengths > 0, ascending,
// no overlap, nothing ending at or before from, nothing past size.
func collect(t *testing.T, from, size int64, run func(emit func(Range) error) error) []Range {
	t.Helper()
	var out []Range
	err := run(func(r Range) error {
		if r.Length <= 0 {
			t.Fatalf("range %+v has no length", r)
		}
		if r.End() <= from {
			t.Fatalf("range %+v ends before the starting offset %d", r, from)
		}
		if r.End() > size {
			t.Fatalf("range %+v ends past the size %d", r, size)
		}
		if n := len(out); n > 0 && out[n-1].End() >= r.Offset {
			t.Fatalf("range %+v overlaps or touches the one before, %+v (adjacent ranges are merged)", r, out[n-1])
		}
		out = append(out, r)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func readAll(t *testing.T, path string, size int64) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) < size {
		b = append(b, make([]byte, size-int64(len(b)))...)
	}
	return b[:size]
}

func open(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

func size(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// checkAllocated checks that every non-zero byte of the image lies in a
// reported range.
func checkAllocated(t *testing.T, img []byte, ranges []Range) {
	t.Helper()
	i := 0
	for off, b := range img {
		if b == 0 {
			continue
		}
		for i < len(ranges) && ranges[i].End() <= int64(off) {
			i++
		}
		if i == len(ranges) || ranges[i].Offset > int64(off) {
			t.Fatalf("byte %d is %#x but lies in no allocated range", off, b)
		}
	}
}

// checkDelta rebuilds target from base and target's bytes at the reported
// ranges, and checks that exactly the blocks that differ were reported (or,
// when not exact, at least those).
func checkDelta(t *testing.T, base, target []byte, ranges []Range, exact bool) int64 {
	t.Helper()
	rebuilt := make([]byte, len(target))
	copy(rebuilt, base)
	reported := int64(0)
	for _, r := range ranges {
		if r.Offset%BlockSize != 0 || (r.Length%BlockSize != 0 && r.End() != int64(len(target))) {
			t.Fatalf("range %+v is not block-aligned", r)
		}
		copy(rebuilt[r.Offset:r.End()], target[r.Offset:r.End()])
		reported += r.Length
	}
	if !bytes.Equal(rebuilt, target) {
		for off := range target {
			if rebuilt[off] != target[off] {
				t.Fatalf("base plus the delta differs from the target at byte %d: the delta missed a change", off)
			}
		}
	}
	differing := int64(0)
	padded := make([]byte, len(target))
	copy(padded, base)
	for off := 0; off < len(target); off += BlockSize {
		end := min(off+BlockSize, len(target))
		if !bytes.Equal(padded[off:end], target[off:end]) {
			differing += int64(end - off)
		}
	}
	if reported != differing && (exact || reported < differing) {
		t.Fatalf("the delta reports %d bytes; %d bytes of blocks differ", reported, differing)
	}
	return differing
}

// writer makes the kinds of writes a volume sees, at random places.
type writer struct {
	t   *testing.T
	f   *os.File
	rng *rand.Rand
	// written counts the bytes written or punched since the last reset.
	written int64
}

func (w *writer) pwrite(off int64, n int) {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(w.rng.IntN(255) + 1)
	}
	if _, err := w.f.WriteAt(b, off); err != nil {
		w.t.Fatal(err)
	}
	w.written += int64(n)
}

// scatter writes n writes of the given kinds over the first size bytes.
func (w *writer) scatter(n int, size int64) {
	for range n {
		switch w.rng.IntN(5) {
		case 0: // smaller than a block, unaligned
			w.pwrite(w.rng.Int64N(size-600), 1+w.rng.IntN(511))
		case 1: // one block
			w.pwrite(w.rng.Int64N(size/BlockSize)*BlockSize, BlockSize)
		case 2: // straddles a 64 KiB boundary (and so extents)
			b := (1 + w.rng.Int64N(size/(64<<10)-1)) * (64 << 10)
			w.pwrite(b-BlockSize/2-int64(w.rng.IntN(100)), BlockSize+w.rng.IntN(3000))
		case 3: // a long run
			w.pwrite(w.rng.Int64N(size-mib), 128<<10+w.rng.IntN(256<<10))
		case 4: // a hole punched into data
			off := w.rng.Int64N(size/BlockSize-8) * BlockSize
			n := int64(1+w.rng.IntN(8)) * BlockSize
			if err := unix.Fallocate(int(w.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
				w.t.Fatal(err)
			}
			w.written += n
		}
	}
	if err := w.f.Sync(); err != nil {
		w.t.Fatal(err)
	}
}

// snapshot copies the image as the pool does (a reflink where the
// filesystem can, else a sparse copy).
func snapshot(t *testing.T, src, dst string) imagecopy.Method {
	t.Helper()
	m, err := imagecopy.Copy(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// scratchFS mounts a filesystem of its own, on a sparse image in a loop
// device; everything is undone at cleanup.
func scratchFS(t *testing.T, fsType string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and mounts")
	}
	if _, err := exec.LookPath("mkfs." + fsType); err != nil {
		t.Skipf("mkfs.%s is not installed", fsType)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 1<<30); err != nil {
		t.Fatal(err)
	}
	dev, err := loop.Attach(img, loop.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := loop.Detach(dev.Path); err != nil {
			t.Errorf("detach %s: %v", dev.Path, err)
		}
	})
	args := []string{"-q", "-f", dev.Path}
	if strings.HasPrefix(fsType, "ext") {
		args[1] = "-F"
	}
	if out, err := exec.Command("mkfs."+fsType, args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.%s: %v: %s", fsType, err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev.Path, mnt, fsType, 0, ""); err != nil {
		if errors.Is(err, unix.ENODEV) {
			t.Skipf("kernel does not support %s", fsType)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt
}

// The property of changed block tracking, on every pool filesystem: for
// snapshots S1 and S2 of one image, S1 plus S2's bytes at Delta(S1, S2) is
// S2, exactly the differing blocks are reported, Allocated(S) covers every
// non-zero byte of S, and a resumed call continues where it was cut off.
// Between the snapshots: writes smaller than a block, writes straddling
// extents, long runs, punched holes, a truncation and an expansion.
func TestDeltaProperty(t *testing.T) {
	for _, fsType := range []string{"ext4", "xfs", "btrfs"} {
		t.Run(fsType, func(t *testing.T) {
			mnt := scratchFS(t, fsType)
			for seed := uint64(1); seed <= 4; seed++ {
				testDeltaProperty(t, mnt, fsType, seed)
			}
		})
	}
}

func testDeltaProperty(t *testing.T, mnt, fsType string, seed uint64) {
	const size1, size2 = 48 * mib, 64 * mib
	dir := filepath.Join(mnt, "seed", string(rune('a'+seed)))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	vol, s1, s2 := filepath.Join(dir, "disk.img"), filepath.Join(dir, "s1.img"), filepath.Join(dir, "s2.img")
	f, err := os.OpenFile(vol, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size1); err != nil {
		t.Fatal(err)
	}
	w := &writer{t: t, f: f, rng: rand.New(rand.NewPCG(seed, 7))}
	w.scatter(200, size1)
	method := snapshot(t, vol, s1)
	w.written = 0
	w.scatter(60, size1)
	// A truncation into data and back (the tail reads as zeros), then an
	// expansion with data in the new part.
	cut := size1 - int64(w.rng.IntN(64))*BlockSize - 1000
	if err := f.Truncate(cut); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size2); err != nil {
		t.Fatal(err)
	}
	w.pwrite(size1+3*mib+123, 70000)
	w.scatter(20, size2)
	if seed == 1 {
		// A block rewritten with the bytes it had: the delta is of
		// contents, so it is not reported.
		b := make([]byte, BlockSize)
		if _, err := f.ReadAt(b, 5*BlockSize); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(b, 5*BlockSize); err != nil {
			t.Fatal(err)
		}
		_ = f.Sync()
	}
	snapshot(t, vol, s2)
	img1, img2 := readAll(t, s1, size1), readAll(t, s2, size2)
	f1, f2 := open(t, s1), open(t, s2)
	ctx := context.Background()

	for _, c := range []struct {
		f    *os.File
		img  []byte
		size int64
	}{{f1, img1, size1}, {f2, img2, size2}} {
		all := collect(t, 0, c.size, func(emit func(Range) error) error { return Allocated(ctx, c.f, 0, c.size, emit) })
		checkAllocated(t, c.img, all)
		// Resumed past the middle of a range: the rest, with the first
		// range cut at the offset.
		if len(all) > 2 {
			mid := all[len(all)/2]
			from := mid.Offset + mid.Length/2
			rest := collect(t, from, c.size, func(emit func(Range) error) error { return Allocated(ctx, c.f, from, c.size, emit) })
			if len(rest) == 0 || rest[0] != (Range{from, mid.End() - from}) || len(rest) != len(all)-len(all)/2 {
				t.Fatalf("Allocated from %d: %v..., want %v then the %d ranges after it", from, rest[:min(2, len(rest))], Range{from, mid.End() - from}, len(all)-len(all)/2-1)
			}
		}
	}

	var st Stats
	delta := collect(t, 0, size2, func(emit func(Range) error) (err error) {
		st, err = Delta(ctx, f1, f2, size1, size2, 0, DeltaOptions{}, emit)
		return err
	})
	differing := checkDelta(t, img1, img2, delta, true)
	t.Logf("%s seed %d: copy %s, %d ranges, %d KiB reported for %d KiB written; %d KiB proven shared, %d KiB compared (%s)",
		fsType, seed, method, len(delta), st.ReportedBytes>>10, w.written>>10, st.SharedBytes>>10, st.ComparedBytes>>10, st.Method)
	if st.Method != "extents" {
		t.Errorf("%s maps extents, but Delta used %s", fsType, st.Method)
	}
	if method == imagecopy.Reflink {
		// The extent maps settle what was not written: the bytes read are
		// bounded by the writes (and what the filesystem copied on write
		// around them), not by the data.
		if st.SharedBytes == 0 || st.ComparedBytes > 16*w.written+8*mib {
			t.Errorf("on a reflinking pool %d bytes were compared and %d proven shared, for %d written", st.ComparedBytes, st.SharedBytes, w.written)
		}
	}
	if method == imagecopy.Reflink {
		// Trusting the extent maps: nothing read, every change still
		// reported, and little more (the one block rewritten with its old
		// bytes, and blocks the filesystem copied on write around the
		// sub-block writes).
		var trusted Stats
		fast := collect(t, 0, size2, func(emit func(Range) error) (err error) {
			trusted, err = Delta(ctx, f1, f2, size1, size2, 0, DeltaOptions{TrustExtents: true}, emit)
			return err
		})
		checkDelta(t, img1, img2, fast, false)
		t.Logf("%s seed %d, extents trusted: %d KiB reported for %d KiB of differing blocks, %d KiB compared",
			fsType, seed, trusted.ReportedBytes>>10, differing>>10, trusted.ComparedBytes>>10)
		if trusted.ComparedBytes != 0 || trusted.ReportedBytes > differing+differing/4+64<<10 {
			t.Errorf("trusting the extents: %d bytes compared, %d reported for %d differing", trusted.ComparedBytes, trusted.ReportedBytes, differing)
		}
	}
	// Resumed from an unaligned offset inside the delta.
	if len(delta) > 2 {
		mid := delta[len(delta)/2]
		from := mid.Offset + 1
		rest := collect(t, from, size2, func(emit func(Range) error) error {
			_, err := Delta(ctx, f1, f2, size1, size2, from, DeltaOptions{}, emit)
			return err
		})
		if len(rest) != len(delta)-len(delta)/2 || rest[0] != mid {
			t.Fatalf("Delta from %d: %d ranges starting %v, want %d starting %v", from, len(rest), rest[0], len(delta)-len(delta)/2, mid)
		}
	}
	// A snapshot against itself has no delta.
	if same := collect(t, 0, size2, func(emit func(Range) error) error {
		_, err := Delta(ctx, f2, f2, size2, size2, 0, DeltaOptions{TrustExtents: true}, emit)
		return err
	}); len(same) != 0 {
		t.Fatalf("a snapshot differs from itself at %v", same[0])
	}
}

// Without FIEMAP (FUSE shares, tmpfs), data and holes come from
// SEEK_DATA/SEEK_HOLE and every data range is compared: still exact.
func TestDeltaWithoutExtentMaps(t *testing.T) {
	noFiemap = true
	defer func() { noFiemap = false }()
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	f, err := os.OpenFile(a, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(8 * mib); err != nil {
		t.Fatal(err)
	}
	w := &writer{t: t, f: f, rng: rand.New(rand.NewPCG(3, 3))}
	w.scatter(30, 8*mib)
	img1 := readAll(t, a, 8*mib)
	if err := os.WriteFile(b, img1, 0o600); err != nil {
		t.Fatal(err)
	}
	g, err := os.OpenFile(b, os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	w2 := &writer{t: t, f: g, rng: rand.New(rand.NewPCG(4, 4))}
	w2.scatter(10, 8*mib)
	img2 := readAll(t, b, 8*mib)
	var st Stats
	delta := collect(t, 0, 8*mib, func(emit func(Range) error) (err error) {
		st, err = Delta(context.Background(), open(t, a), open(t, b), 8*mib, 8*mib, 0, DeltaOptions{TrustExtents: true}, emit)
		return err
	})
	checkDelta(t, img1, img2, delta, true)
	if st.Method != "seek" || st.SharedBytes != 0 {
		t.Fatalf("stats %+v, want the seek method and nothing shared", st)
	}
	all := collect(t, 0, 8*mib, func(emit func(Range) error) error {
		return Allocated(context.Background(), open(t, b), 0, 8*mib, emit)
	})
	checkAllocated(t, img2, all)
}

// An emit error stops the walk and is returned; so is a cancelled context.
func TestStops(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "img")
	data := bytes.Repeat([]byte{1}, 3*BlockSize)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, "img2")
	if err := os.WriteFile(q, bytes.Repeat([]byte{2}, 3*BlockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("stream broken")
	emitErr := func(Range) error { return boom }
	if err := Allocated(context.Background(), open(t, p), 0, size(t, p), emitErr); !errors.Is(err, boom) {
		t.Fatalf("Allocated with a failing emit: %v", err)
	}
	if _, err := Delta(context.Background(), open(t, p), open(t, q), size(t, p), size(t, q), 0, DeltaOptions{}, emitErr); !errors.Is(err, boom) {
		t.Fatalf("Delta with a failing emit: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Allocated(ctx, open(t, p), 0, size(t, p), func(Range) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Fatalf("Allocated with a cancelled context: %v", err)
	}
	if _, err := Delta(ctx, open(t, p), open(t, q), size(t, p), size(t, q), 0, DeltaOptions{}, func(Range) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Fatalf("Delta with a cancelled context: %v", err)
	}
}
