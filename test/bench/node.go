package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/test/csiclient"
)

// Volume sizes of figure 2: the smallest xfs mkfs.xfs accepts is 300 MiB.
const (
	ext4StageBytes = 64 << 20
	xfsStageBytes  = 300 << 20
)

// stageSamples are the latencies of figure 2, in milliseconds.
type stageSamples struct {
	firstExt4, firstXFS, restage []float64
	publish, unpublish, unstage  []float64
	refFirst, refRestage         []float64 // the same steps done directly by the bench
	// CPU seconds used by the programs the driver ran (mkfs, blkid,
	// mount...), summed over the first stages and over the restages.
	firstToolCPU, restageToolCPU float64
}

// figureStage is figure 2: every node call of a volume's life, each time on
// a volume that was just created and attached (ControllerPublishVolume) to
// the node, next to the kernel work done directly by the bench.
func (b *bench) figureStage(ctx context.Context) error {
	dir := filepath.Join(b.work, "node")
	ref := filepath.Join(b.work, "reference")
	for _, d := range []string{dir, ref} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return err
		}
	}
	var s stageSamples
	for i := range b.cfg.stageIters {
		if err := b.ext4Cycle(ctx, dir, fmt.Sprintf("stage-ext4-%02d", i), &s); err != nil {
			return err
		}
		xfs, err := b.firstStage(ctx, dir, fmt.Sprintf("stage-xfs-%02d", i), xfsStageBytes, "xfs")
		if err != nil {
			return err
		}
		s.firstXFS = append(s.firstXFS, xfs)
		if err := referenceStage(ctx, ref, i, &s); err != nil {
			return err
		}
	}
	b.addStageRows(s)
	return nil
}

// ext4Cycle creates and attaches a blank ext4 volume, then times its first
// stage (with mkfs), publish, unpublish, unstage and a second stage of the
// now formatted volume.
func (b *bench) ext4Cycle(ctx context.Context, dir, name string, s *stageSamples) (err error) {
	v, err := b.c.Create(ctx, name, ext4StageBytes, csiclient.MountCap("ext4"), nil, nodeID, dir)
	if v != nil {
		defer func() { err = errors.Join(err, discard(b.c, v)) }()
	}
	if err != nil {
		return err
	}
	steps := []struct {
		samples *[]float64
		toolCPU *float64
		call    func() error
	}{
		{&s.firstExt4, &s.firstToolCPU, func() error { _, err := b.c.NodeStageVolume(ctx, stageRequest(v)); return err }},
		{&s.publish, nil, func() error { _, err := b.c.NodePublishVolume(ctx, publishRequest(v)); return err }},
		{&s.unpublish, nil, func() error { _, err := b.c.NodeUnpublishVolume(ctx, unpublishRequest(v)); return err }},
		{&s.unstage, nil, func() error { _, err := b.c.NodeUnstageVolume(ctx, unstageRequest(v)); return err }},
		{&s.restage, &s.restageToolCPU, func() error { _, err := b.c.NodeStageVolume(ctx, stageRequest(v)); return err }},
	}
	for _, st := range steps {
		before, err := b.main.cpuTimes()
		if err != nil {
			return err
		}
		d, err := timed(st.call)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		after, err := b.main.cpuTimes()
		if err != nil {
			return err
		}
		*st.samples = append(*st.samples, d)
		if st.toolCPU != nil {
			*st.toolCPU += after.children - before.children
		}
	}
	return nil
}

// firstStage creates and attaches a blank volume and times its first stage.
func (b *bench) firstStage(ctx context.Context, dir, name string, n int64, fsType string) (_ float64, err error) {
	v, err := b.c.Create(ctx, name, n, csiclient.MountCap(fsType), nil, nodeID, dir)
	if v != nil {
		defer func() { err = errors.Join(err, discard(b.c, v)) }()
	}
	if err != nil {
		return 0, err
	}
	d, err := timed(func() error { _, err := b.c.NodeStageVolume(ctx, stageRequest(v)); return err })
	if err != nil {
		return 0, fmt.Errorf("%s: NodeStageVolume: %w", name, err)
	}
	return d, nil
}

// referenceStage does directly what a stage of a 64 MiB ext4 volume needs
// from the kernel and mkfs: attach a loop device with direct I/O, mkfs.ext4
// with the options the driver uses, mount; then, once it is formatted, only
// attach and mount. The difference to NodeStageVolume is the driver's own
// cost (its checks, the tools it runs, the gRPC call).
func referenceStage(ctx context.Context, dir string, i int, s *stageSamples) (err error) {
	img := filepath.Join(dir, fmt.Sprintf("ref-%02d.img", i))
	mnt := filepath.Join(dir, fmt.Sprintf("ref-%02d", i))
	if err := makeSparseFile(img, ext4StageBytes); err != nil {
		return err
	}
	defer func() { err = errors.Join(err, os.Remove(img)) }()
	if err := os.Mkdir(mnt, 0o750); err != nil {
		return fmt.Errorf("reference stage: %w", err)
	}
	defer func() { err = errors.Join(err, os.Remove(mnt)) }()

	var samples [2]float64
	for pass, format := range []bool{true, false} {
		var dev *loop.Device
		samples[pass], err = timed(func() (err error) {
			dev, err = attachMount(ctx, img, mnt, format)
			return err
		})
		if err != nil {
			return fmt.Errorf("reference stage: %w", err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			return errors.Join(fmt.Errorf("reference stage: unmount %s: %w", mnt, err), loop.Detach(dev.Path))
		}
		if err := loop.Detach(dev.Path); err != nil {
			return fmt.Errorf("reference stage: %w", err)
		}
	}
	s.refFirst, s.refRestage = append(s.refFirst, samples[0]), append(s.refRestage, samples[1])
	return nil
}

// attachMount attaches img to a loop device with direct I/O, formats it
// with ext4 when format is set, and mounts it at mnt. On failure nothing is
// left attached.
func attachMount(ctx context.Context, img, mnt string, format bool) (_ *loop.Device, err error) {
	dev, err := loop.Attach(img, loop.Options{DirectIO: true})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, loop.Detach(dev.Path))
		}
	}()
	if format {
		if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-F", "-m0", dev.Path).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("mkfs.ext4 %s: %w: %s", dev.Path, err, out)
		}
	}
	if err := unix.Mount(dev.Path, mnt, "ext4", 0, ""); err != nil {
		return nil, fmt.Errorf("mount %s on %s: %w", dev.Path, mnt, err)
	}
	return dev, nil
}

func makeSparseFile(path string, n int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := errors.Join(f.Truncate(n), f.Close()); err != nil {
		return fmt.Errorf("sizing %s: %w", path, err)
	}
	return nil
}

func (b *bench) addStageRows(s stageSamples) {
	first := summary("NodeStageVolume, first stage of a blank 64 MiB ext4 volume (attach, mkfs, mount)", s.firstExt4, latency, below(150, "< 150 ms"))
	first.reason = b.stageReason("attach + mkfs.ext4 + mount(2)", first.median, s.refFirst, s.firstToolCPU/float64(len(s.firstExt4)))
	restage := summary("NodeStageVolume, restage of a formatted ext4 volume (attach, mount)", s.restage, latency, below(30, "< 30 ms"))
	restage.reason = b.stageReason("attach + mount(2)", restage.median, s.refRestage, s.restageToolCPU/float64(len(s.restage)))
	b.add(
		first,
		summary("reference: loop attach + mkfs.ext4 -F -m0 + mount, by the bench", s.refFirst, latency, nil),
		summary("NodeStageVolume, first stage of a blank 300 MiB xfs volume (attach, mkfs, mount)", s.firstXFS, latency, nil),
		restage,
		summary("reference: loop attach + mount, by the bench", s.refRestage, latency, nil),
		summary("NodePublishVolume (bind mount)", s.publish, latency, nil),
		summary("NodeUnpublishVolume", s.unpublish, latency, nil),
		summary("NodeUnstageVolume (unmount, detach)", s.unstage, latency, nil),
	)
}

// stageReason compares a stage with the same kernel work done directly,
// and tells how much of the difference is CPU spent in the programs the
// driver runs.
func (b *bench) stageReason(what string, median float64, ref []float64, toolCPU float64) string {
	refMs := quantile(ref, 0.5)
	return fmt.Sprintf("%s done directly take %s; the driver adds %s, of which %s is CPU in the programs it runs (starting one costs %s here)",
		what, formatMs(refMs), formatMs(median-refMs), formatMs(1000*toolCPU), formatMs(b.spawnMs))
}

func stageRequest(v *csiclient.Volume) *csi.NodeStageVolumeRequest {
	return &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: v.PublishContext, Secrets: v.Secrets}
}

func publishRequest(v *csiclient.Volume) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: v.Target,
		VolumeCapability: v.Cap, PublishContext: v.PublishContext}
}

func unpublishRequest(v *csiclient.Volume) *csi.NodeUnpublishVolumeRequest {
	return &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: v.Target}
}

func unstageRequest(v *csiclient.Volume) *csi.NodeUnstageVolumeRequest {
	return &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging}
}

// discard unpublishes, unstages, detaches and deletes a volume, whatever
// state it is in (every one of those calls is idempotent). It has a context
// of its own so that it also runs after an interrupt.
func discard(c *csiclient.Client, v *csiclient.Volume) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := retryAborted(ctx, func() error { return c.UnpublishAndUnstage(ctx, v) }); err != nil {
		return fmt.Errorf("discarding %s: %w", v.ID, err)
	}
	if err := retryAborted(ctx, func() error { return c.Delete(ctx, v, nodeID) }); err != nil {
		return fmt.Errorf("discarding %s: %w", v.ID, err)
	}
	return nil
}

// retryAborted retries fn while the driver answers Aborted: after an
// interrupt, the call the bench gave up on may still hold the volume's
// lock in the driver until it finishes.
func retryAborted(ctx context.Context, fn func() error) error {
	for {
		err := fn()
		if status.Code(err) != codes.Aborted {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}
