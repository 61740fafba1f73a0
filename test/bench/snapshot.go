package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

const (
	snapVolumeBytes = 1 << 30
	// xfsPoolBytes holds the 1 GiB source volume and one 1 GiB restore:
	// the driver counts thin volumes by their full size.
	xfsPoolBytes = 3 << 30
	// ioChunk is the unit of the bench's own O_DIRECT writes and reads.
	ioChunk = 4 << 20
)

// figureSnapshots is figure 3: CreateSnapshot of a 1 GiB volume holding
// random data, and CreateVolume from that snapshot, on a pool on xfs
// (reflinks) and on the ext4 pool of the main driver (sparse copies).
func (b *bench) figureSnapshots(ctx context.Context) (err error) {
	var undo cleanups
	defer func() { err = errors.Join(err, undo.run()) }()
	c, xfsPool, err := b.startXFSPool(ctx, &undo, "xfs", xfsPoolBytes)
	if err != nil {
		return err
	}
	if err := b.snapshotRuns(ctx, c, xfsPool, "xfs", below(50, "< 50 ms")); err != nil {
		return fmt.Errorf("xfs pool: %w", err)
	}
	if err := undo.run(); err != nil {
		return err
	}
	if err := b.snapshotRuns(ctx, b.c, b.pool, "ext4", nil); err != nil {
		return fmt.Errorf("ext4 pool: %w", err)
	}
	return nil
}

// startXFSPool makes an xfs filesystem (with reflink) of n bytes on a
// sparse image attached to a loop device, mounts it, and starts a second
// driver, called name, whose pool lives there. The steps to undo it all go
// on undo.
func (b *bench) startXFSPool(ctx context.Context, undo *cleanups, name string, n int64) (*csiclient.Client, string, error) {
	c, poolDir, facts, err := b.startScratchPool(ctx, undo, name, "xfs", n)
	if err == nil {
		b.facts.xfsPool = facts
	}
	return c, poolDir, err
}

// mkfsArgs are the commands that make each scratch pool filesystem: xfs
// with reflink (the default of current xfsprogs, said anyway), btrfs and
// ext4 with their defaults.
var mkfsArgs = map[string][]string{
	"xfs":   {"mkfs.xfs", "-q", "-f", "-m", "reflink=1"},
	"ext4":  {"mkfs.ext4", "-q", "-F"},
	"btrfs": {"mkfs.btrfs", "-q", "-f"},
}

// startScratchPool makes a filesystem of type fsType and n bytes on a
// sparse image attached to a loop device (direct I/O), mounts it, and
// starts a second driver, called name, whose pool lives there. It returns
// the client, the pool directory and a description of the filesystem; the
// steps to undo it all go on undo.
func (b *bench) startScratchPool(ctx context.Context, undo *cleanups, name, fsType string, n int64) (*csiclient.Client, string, string, error) {
	mkfs, ok := mkfsArgs[fsType]
	if !ok {
		return nil, "", "", fmt.Errorf("no scratch pool of type %q", fsType)
	}
	img := filepath.Join(b.work, name+"-pool.img")
	mnt := filepath.Join(b.work, name+"-pool")
	if err := makeSparseFile(img, n); err != nil {
		return nil, "", "", fmt.Errorf("%s pool image: %w", fsType, err)
	}
	dev, err := loop.Attach(img, loop.Options{DirectIO: true})
	if err != nil {
		return nil, "", "", fmt.Errorf("%s pool: %w", fsType, err)
	}
	undo.add("detach the "+name+" pool's loop device", func() error { return loop.Detach(dev.Path) })
	undo.add("remove the "+name+" pool's image", func() error { return os.Remove(img) })
	if out, err := exec.CommandContext(ctx, mkfs[0], append(mkfs[1:], dev.Path)...).CombinedOutput(); err != nil {
		return nil, "", "", fmt.Errorf("%s %s: %w: %s", mkfs[0], dev.Path, err, out)
	}
	if err := os.Mkdir(mnt, 0o750); err != nil {
		return nil, "", "", fmt.Errorf("%s pool: %w", fsType, err)
	}
	if err := unix.Mount(dev.Path, mnt, fsType, 0, ""); err != nil {
		return nil, "", "", fmt.Errorf("mounting %s pool %s on %s: %w", fsType, dev.Path, mnt, err)
	}
	undo.add("unmount the "+name+" pool", func() error { return unix.Unmount(mnt, 0) })
	facts := fmt.Sprintf("%s; a sparse file on the pool filesystem, on %s with direct I/O, %s",
		filesystemOf(mnt), dev.Path, strings.Join(mkfs, " "))

	poolDir := filepath.Join(mnt, "pool")
	d, err := startDriver(b.spool, name, filepath.Join(b.work, name), poolDir)
	if err != nil {
		return nil, "", "", err
	}
	undo.add("stop the "+name+" pool's driver", func() error {
		err := d.stop()
		b.peakRSS = max(b.peakRSS, d.peakRSS)
		return err
	})
	if _, err := d.waitReady(ctx, 30*time.Second); err != nil {
		return nil, "", "", err
	}
	c, err := csiclient.Dial(d.endpoint)
	if err != nil {
		return nil, "", "", err
	}
	undo.add("close the "+name+" pool's connection", c.Close)
	return c, poolDir, facts, nil
}

// snapshotRuns fills a 1 GiB block volume with random data through its
// published device, then snapshots it and restores the snapshot
// cfg.snapRuns times, each with the page cache dropped first.
func (b *bench) snapshotRuns(ctx context.Context, c *csiclient.Client, poolDir, fsName string, snapTarget *target) (err error) {
	dir := filepath.Join(b.work, "snap-"+fsName)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	v, err := c.Create(ctx, "snap-source", snapVolumeBytes, csiclient.BlockCap(), nil, nodeID, dir)
	if v != nil {
		defer func() { err = errors.Join(err, discard(c, v)) }()
	}
	if err != nil {
		return err
	}
	if err := c.StageAndPublish(ctx, v); err != nil {
		return err
	}
	data := int64(b.cfg.snapDataMiB) << 20
	start := time.Now()
	if err := writeRandom(ctx, v.Target, data); err != nil {
		return err
	}
	logf("%s pool: wrote %d MiB of random data in %v", fsName, data>>20, time.Since(start).Round(time.Millisecond))

	var snaps, restores []float64
	var snapMethod, restoreMethod string
	for run := range b.cfg.snapRuns {
		st, rt, sm, rm, err := snapshotAndRestore(ctx, c, poolDir, v.ID, run)
		if err != nil {
			return err
		}
		snaps, restores = append(snaps, st), append(restores, rt)
		snapMethod, restoreMethod = sm, rm
	}
	what := fmt.Sprintf("1 GiB volume holding %d MiB of random data, %s pool", data>>20, fsName)
	b.add(
		summary(fmt.Sprintf("CreateSnapshot, %s (%s)", what, snapMethod), snaps, latency, snapTarget),
		summary(fmt.Sprintf("CreateVolume from that snapshot, %s pool (%s)", fsName, restoreMethod), restores, latency, nil),
	)
	return nil
}

// snapshotAndRestore times one CreateSnapshot of the volume and one
// CreateVolume from the snapshot, reads how the driver copied each, and
// deletes both again.
func snapshotAndRestore(ctx context.Context, c *csiclient.Client, poolDir, volID string, run int) (snapMs, restoreMs float64, snapMethod, restoreMethod string, err error) {
	if err := dropCaches(); err != nil {
		return 0, 0, "", "", err
	}
	var snapID string
	snapMs, err = timed(func() error {
		resp, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("snap-%d", run), SourceVolumeId: volID})
		snapID = resp.GetSnapshot().GetSnapshotId()
		return err
	})
	if err != nil {
		return 0, 0, "", "", fmt.Errorf("CreateSnapshot: %w", err)
	}
	defer func() {
		if _, derr := c.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: snapID}); derr != nil {
			err = errors.Join(err, fmt.Errorf("DeleteSnapshot: %w", derr))
		}
	}()
	if err := dropCaches(); err != nil {
		return 0, 0, "", "", err
	}
	var restoreID string
	restoreMs, err = timed(func() error {
		resp, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name:               fmt.Sprintf("restore-%d", run),
			CapacityRange:      &csi.CapacityRange{RequiredBytes: snapVolumeBytes},
			VolumeCapabilities: []*csi.VolumeCapability{csiclient.BlockCap()},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}},
		})
		restoreID = resp.GetVolume().GetVolumeId()
		return err
	})
	if err != nil {
		return 0, 0, "", "", fmt.Errorf("CreateVolume from snapshot: %w", err)
	}
	defer func() {
		if _, derr := c.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: restoreID}); derr != nil {
			err = errors.Join(err, fmt.Errorf("DeleteVolume: %w", derr))
		}
	}()
	snapMethod = copyMethod(filepath.Join(poolDir, "snapshots", token(snapID), "snapshot.json"), false)
	restoreMethod = copyMethod(filepath.Join(pool.VolumeDir(poolDir, restoreID), pool.MetadataName), true)
	return snapMs, restoreMs, snapMethod, restoreMethod, nil
}

// token is the last part of a volume or snapshot ID, the name of its
// directory in the pool.
func token(id string) string {
	return strings.TrimPrefix(id[strings.LastIndexByte(id, ':')+1:], "snap-")
}

// copyMethod reads how the driver copied an image (reflink or sparse-copy)
// from a snapshot's metadata, or from a volume's source.
func copyMethod(metaPath string, ofSource bool) string {
	data, err := os.ReadFile(metaPath)
	if err != nil {
		return "method unknown"
	}
	var m struct {
		Method string
		Source struct{ Method string }
	}
	if json.Unmarshal(data, &m) != nil {
		return "method unknown"
	}
	if ofSource {
		return m.Source.Method
	}
	return m.Method
}

// writeRandom writes n bytes of random data at the start of path (a block
// device) with O_DIRECT, then fsyncs it.
func writeRandom(ctx context.Context, path string, n int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return fmt.Errorf("writing random data: %w", err)
	}
	buf, free, err := alignedBuffer(ioChunk)
	if err != nil {
		return errors.Join(err, f.Close())
	}
	defer free()
	var seed [32]byte
	rng := rand.NewChaCha8(seed)
	for off := int64(0); off < n; off += ioChunk {
		if err := ctx.Err(); err != nil {
			return errors.Join(err, f.Close())
		}
		_, _ = rng.Read(buf) // never fails
		if _, err := f.WriteAt(buf[:min(ioChunk, n-off)], off); err != nil {
			return errors.Join(fmt.Errorf("writing random data to %s: %w", path, err), f.Close())
		}
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return fmt.Errorf("writing random data to %s: %w", path, err)
	}
	return nil
}

// alignedBuffer returns a page-aligned buffer, as O_DIRECT needs, and the
// function that frees it.
func alignedBuffer(n int) ([]byte, func(), error) {
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, fmt.Errorf("allocating an aligned buffer: %w", err)
	}
	return buf, func() { _ = unix.Munmap(buf) }, nil
}
