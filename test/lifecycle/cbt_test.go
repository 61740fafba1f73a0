package lifecycle

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/pkg/volid"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

// Changed block tracking through the driver, on real volumes: a block and
// an ext4 volume on ext4, xfs and btrfs pools are written through their
// loop devices, snapshotted (the filesystem frozen), written again (the
// block volume also expanded) and snapshotted again. The snapshot images
// then satisfy the service's promises: the first plus the second's bytes at
// every range of GetMetadataDelta is the second, byte for byte, and
// GetMetadataAllocated covers every non-zero byte.
func TestChangedBlockTracking(t *testing.T) {
	for _, poolFS := range []string{"ext4", "xfs", "btrfs"} {
		for _, kind := range []string{"block", "ext4"} {
			t.Run(poolFS+"-pool/"+kind, func(t *testing.T) {
				leakcheck.RequireRoot(t)
				requireMkfs(t, poolFS)
				dir := t.TempDir()
				leakcheck.Check(t, dir)
				poolDir := filepath.Join(mountPoolFS(t, dir, poolFS, 1<<30), "pool")
				e := newEnvWithPool(t, dir, poolDir)
				testCBT(t, e, poolDir, kind)
			})
		}
	}
}

func testCBT(t *testing.T, e *env, poolDir, kind string) {
	c := ctx(t)
	rng := rand.New(rand.NewPCG(uint64(len(poolDir)), 11))
	vc := csiclient.BlockCap()
	if kind != "block" {
		vc = csiclient.MountCap(kind)
	}
	const size = 64 << 20
	v := e.publishNew(c, "cbt", size, vc, nil)
	// write changes the volume: random blocks and sub-block writes on the
	// device, or files created, appended to, rewritten in part and removed.
	files := []string{}
	write := func(n int, devSize int64) {
		for i := range n {
			b := make([]byte, 1+rng.IntN(64<<10))
			for j := range b {
				b[j] = byte(rng.IntN(256))
			}
			if kind == "block" {
				if err := csiclient.WriteAt(v.Target, b, rng.Int64N(devSize-int64(len(b)))); err != nil {
					t.Fatal(err)
				}
				continue
			}
			switch {
			case len(files) > 3 && i%5 == 0:
				k := rng.IntN(len(files))
				if err := os.Remove(files[k]); err != nil {
					t.Fatal(err)
				}
				files = append(files[:k], files[k+1:]...)
			case len(files) > 0 && i%3 == 0:
				if err := csiclient.WriteAt(files[rng.IntN(len(files))], b[:min(len(b), 3000)], int64(rng.IntN(4096))); err != nil {
					t.Fatal(err)
				}
			default:
				p := filepath.Join(v.Target, "f"+string(rune('a'+len(files)%26))+string(rune('a'+rng.IntN(26))))
				if err := csiclient.WriteFile(p, b); err != nil {
					t.Fatal(err)
				}
				files = append(files, p)
			}
		}
	}
	write(40, size)
	s1 := e.snapshot(c, "cbt-1", v.ID)
	write(15, size)
	size2 := int64(size)
	if kind == "block" {
		size2 = 96 << 20
		if _, err := e.c.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: v.ID, CapacityRange: &csi.CapacityRange{RequiredBytes: size2}}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.c.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: v.ID, VolumePath: v.Target}); err != nil {
			t.Fatal(err)
		}
		if err := csiclient.WriteAt(v.Target, bytes.Repeat([]byte{7}, 10000), size+5<<20+17); err != nil {
			t.Fatal(err)
		}
	}
	write(5, size2)
	s2 := e.snapshot(c, "cbt-2", v.ID)

	img1, img2 := snapshotImage(t, poolDir, s1), snapshotImage(t, poolDir, s2)
	if int64(len(img1)) != s1.GetSizeBytes() || int64(len(img2)) != s2.GetSizeBytes() {
		t.Fatalf("snapshot images of %d and %d bytes, sizes %d and %d", len(img1), len(img2), s1.GetSizeBytes(), s2.GetSizeBytes())
	}

	alloc := metadataRanges(t, func() (func() ([]*csi.BlockMetadata, int64, error), error) {
		s, err := e.c.GetMetadataAllocated(c, &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), MaxResults: 7})
		return func() ([]*csi.BlockMetadata, int64, error) {
			r, err := s.Recv()
			return r.GetBlockMetadata(), r.GetVolumeCapacityBytes(), err
		}, err
	}, s1.GetSizeBytes())
	allocBytes := int64(0)
	for off, b := range img1 {
		if b != 0 && !covered(alloc, int64(off)) {
			t.Fatalf("byte %d of the first snapshot is %#x but in no allocated range", off, b)
		}
	}
	for _, r := range alloc {
		allocBytes += r.GetSizeBytes()
	}

	delta := metadataRanges(t, func() (func() ([]*csi.BlockMetadata, int64, error), error) {
		s, err := e.c.GetMetadataDelta(c, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId()})
		return func() ([]*csi.BlockMetadata, int64, error) {
			r, err := s.Recv()
			return r.GetBlockMetadata(), r.GetVolumeCapacityBytes(), err
		}, err
	}, s2.GetSizeBytes())
	rebuilt := make([]byte, len(img2))
	copy(rebuilt, img1)
	deltaBytes := int64(0)
	for _, r := range delta {
		copy(rebuilt[r.GetByteOffset():r.GetByteOffset()+r.GetSizeBytes()], img2[r.GetByteOffset():])
		deltaBytes += r.GetSizeBytes()
	}
	if !bytes.Equal(rebuilt, img2) {
		t.Fatal("the first snapshot plus the delta's ranges of the second is not the second snapshot")
	}
	t.Logf("%s volume: allocated %d ranges (%d KiB) of %d MiB; delta %d ranges (%d KiB)", kind, len(alloc), allocBytes>>10, len(img1)>>20, len(delta), deltaBytes>>10)
	if deltaBytes == 0 || deltaBytes > allocBytes+int64(len(img2)-len(img1)) {
		t.Fatalf("the delta reports %d bytes; the first snapshot holds %d: not a delta", deltaBytes, allocBytes)
	}
}

// snapshotImage reads a snapshot's image from the pool.
func snapshotImage(t *testing.T, poolDir string, s *csi.Snapshot) []byte {
	t.Helper()
	id, err := volid.ParseKind(s.GetSnapshotId(), volid.KindSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	return mustRead(t, filepath.Join(poolDir, "snapshots", id.Token, "disk.img"))
}

// metadataRanges drains a SnapshotMetadata stream, checking that every
// message carries the capacity and that ranges ascend without overlap.
func metadataRanges(t *testing.T, open func() (func() ([]*csi.BlockMetadata, int64, error), error), capacity int64) []*csi.BlockMetadata {
	t.Helper()
	recv, err := open()
	if err != nil {
		t.Fatal(err)
	}
	var all []*csi.BlockMetadata
	for {
		list, got, err := recv()
		if errors.Is(err, io.EOF) {
			return all
		}
		if err != nil {
			t.Fatal(err)
		}
		if got != capacity {
			t.Fatalf("volume_capacity_bytes %d, want %d", got, capacity)
		}
		for _, r := range list {
			if n := len(all); n > 0 && all[n-1].GetByteOffset()+all[n-1].GetSizeBytes() > r.GetByteOffset() {
				t.Fatalf("range %v overlaps %v", r, all[n-1])
			}
			if r.GetSizeBytes() <= 0 || r.GetByteOffset()+r.GetSizeBytes() > capacity {
				t.Fatalf("range %v is empty or past %d", r, capacity)
			}
			all = append(all, r)
		}
	}
}

func covered(rs []*csi.BlockMetadata, off int64) bool {
	// rs ascend: binary search for the last range starting at or before off.
	lo, hi := 0, len(rs)
	for lo < hi {
		m := (lo + hi) / 2
		if rs[m].GetByteOffset() <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo > 0 && off < rs[lo-1].GetByteOffset()+rs[lo-1].GetSizeBytes()
}
