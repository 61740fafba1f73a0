package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/test/csiclient"
)

// cbtBlock is the size of the bench's overwrites: a filesystem block.
const cbtBlock = 4096

// figureCBT is figure 7: changed block tracking. A block volume of
// cfg.cbtGiB GiB is filled with random data and snapshotted; 1 % of its
// 4 KiB blocks, chosen at random, are overwritten and it is snapshotted
// again. GetMetadataDelta between the two is timed (page cache dropped
// before each run) on an xfs pool, whose snapshots are reflinks, and on the
// ext4 main pool, whose snapshots are copies; its precision is the bytes
// truly changed over the bytes it reports.
func (b *bench) figureCBT(ctx context.Context) (err error) {
	size := int64(b.cfg.cbtGiB) << 30
	var undo cleanups
	defer func() { err = errors.Join(err, undo.run()) }()
	// The driver charges the volume at its size and each snapshot at the
	// blocks its source's image occupies (on xfs that includes speculative
	// preallocation past the end of the file), plus its reserve; the
	// filesystem holds much less, its blocks being shared.
	c, _, err := b.startXFSPool(ctx, &undo, "cbt-xfs", 5*size+1<<30)
	if err != nil {
		return err
	}
	if err := b.cbtRuns(ctx, c, "xfs", size, below(1000, "< 1 s"), atLeast(0.9, "≥ 0.9")); err != nil {
		return fmt.Errorf("xfs pool: %w", err)
	}
	if err := undo.run(); err != nil {
		return err
	}
	if err := b.cbtRuns(ctx, b.c, "ext4", size, nil, nil); err != nil {
		return fmt.Errorf("ext4 pool: %w", err)
	}
	return nil
}

// cbtRuns fills a volume, snapshots it, overwrites 1 % of its blocks,
// snapshots it again and times GetMetadataAllocated of the first and
// GetMetadataDelta between the two, cfg.snapRuns times each.
func (b *bench) cbtRuns(ctx context.Context, c *csiclient.Client, fsName string, size int64, timeTarget, precisionTarget *target) (err error) {
	dir := filepath.Join(b.work, "cbt-"+fsName)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	v, err := c.Create(ctx, "cbt-source", size, csiclient.BlockCap(), nil, nodeID, dir)
	if v != nil {
		defer func() { err = errors.Join(err, discard(c, v)) }()
	}
	if err != nil {
		return err
	}
	if err := c.StageAndPublish(ctx, v); err != nil {
		return err
	}
	if err := writeRandom(ctx, v.Target, size); err != nil {
		return err
	}
	snap := func(name string) (string, error) {
		resp, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: v.ID})
		if err != nil {
			return "", fmt.Errorf("CreateSnapshot: %w", err)
		}
		id := resp.GetSnapshot().GetSnapshotId()
		return id, nil
	}
	deleteSnap := func(id string) {
		if _, derr := c.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: id}); derr != nil {
			err = errors.Join(err, fmt.Errorf("DeleteSnapshot %s: %w", id, derr))
		}
	}
	s1, err := snap("cbt-1")
	if err != nil {
		return err
	}
	defer deleteSnap(s1)
	changed, err := overwriteBlocks(ctx, v.Target, size, size/cbtBlock/100)
	if err != nil {
		return err
	}
	s2, err := snap("cbt-2")
	if err != nil {
		return err
	}
	defer deleteSnap(s2)

	var deltaMs, allocMs, precision []float64
	var reported, allocated int64
	for range b.cfg.snapRuns {
		if err := dropCaches(); err != nil {
			return err
		}
		ms, err := timed(func() (err error) {
			reported, err = drainDelta(ctx, c, s1, s2)
			return err
		})
		if err != nil {
			return fmt.Errorf("GetMetadataDelta: %w", err)
		}
		deltaMs = append(deltaMs, ms)
		precision = append(precision, float64(changed)/float64(max(reported, 1)))
		if err := dropCaches(); err != nil {
			return err
		}
		ms, err = timed(func() (err error) {
			allocated, err = drainAllocated(ctx, c, s1)
			return err
		})
		if err != nil {
			return fmt.Errorf("GetMetadataAllocated: %w", err)
		}
		allocMs = append(allocMs, ms)
	}
	logf("%s pool: delta reports %d bytes for %d changed; allocated %d of %d bytes", fsName, reported, changed, allocated, size)
	what := fmt.Sprintf("%d GiB block volume full of random data, 1 %% of its 4 KiB blocks overwritten, %s pool", size>>30, fsName)
	precisionRow := summary(fmt.Sprintf("the same: precision, bytes changed / bytes reported (%d MiB / %d MiB)", changed>>20, reported>>20), precision, ratioHi, precisionTarget)
	b.add(
		summary("GetMetadataDelta between two snapshots of a "+what+", page cache dropped", deltaMs, latency, timeTarget),
		precisionRow,
		summary(fmt.Sprintf("GetMetadataAllocated of the first snapshot, %s pool (%d GiB reported)", fsName, allocated>>30), allocMs, latency, nil),
	)
	return nil
}

// overwriteBlocks writes random data over n distinct 4 KiB blocks of the
// device, chosen at random, with O_DIRECT, and returns the bytes written.
func overwriteBlocks(ctx context.Context, path string, size, n int64) (int64, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return 0, err
	}
	buf, free, err := alignedBuffer(cbtBlock)
	if err != nil {
		return 0, errors.Join(err, f.Close())
	}
	defer free()
	rng := rand.New(rand.NewPCG(7, 7))
	seen := make(map[int64]bool, n)
	for int64(len(seen)) < n {
		if err := ctx.Err(); err != nil {
			return 0, errors.Join(err, f.Close())
		}
		blk := rng.Int64N(size / cbtBlock)
		if seen[blk] {
			continue
		}
		seen[blk] = true
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, blk*cbtBlock); err != nil {
			return 0, errors.Join(fmt.Errorf("overwriting block %d of %s: %w", blk, path, err), f.Close())
		}
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return 0, err
	}
	return n * cbtBlock, nil
}

// metadataStream is a GetMetadataDelta or GetMetadataAllocated stream.
type metadataStream[R interface{ GetBlockMetadata() []*csi.BlockMetadata }] interface {
	Recv() (R, error)
}

// drain reads a metadata stream to its end and returns the bytes its
// ranges cover.
func drain[R interface{ GetBlockMetadata() []*csi.BlockMetadata }](s metadataStream[R], err error) (int64, error) {
	if err != nil {
		return 0, err
	}
	var n int64
	for {
		r, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return 0, err
		}
		for _, m := range r.GetBlockMetadata() {
			n += m.GetSizeBytes()
		}
	}
}

// drainDelta streams GetMetadataDelta and returns the bytes it reports.
func drainDelta(ctx context.Context, c *csiclient.Client, base, target string) (int64, error) {
	s, err := c.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target})
	return drain[*csi.GetMetadataDeltaResponse](s, err)
}

// drainAllocated streams GetMetadataAllocated and returns the bytes it
// reports.
func drainAllocated(ctx context.Context, c *csiclient.Client, snap string) (int64, error) {
	s, err := c.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: snap})
	return drain[*csi.GetMetadataAllocatedResponse](s, err)
}
