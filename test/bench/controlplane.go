package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

// thinBytes is the size of the volumes of figures 1 and 5.
const thinBytes = 64 << 20

// figureRoundTrip measures a Probe call, the gRPC cost every other call
// pays on top of its work, and the cost of running a trivial program, the
// least every mkfs, blkid or mount the driver runs costs.
func (b *bench) figureRoundTrip(ctx context.Context) error {
	var lat []float64
	for range 200 {
		d, err := timed(func() error {
			_, err := b.c.Probe(ctx, &csi.ProbeRequest{})
			return err
		})
		if err != nil {
			return fmt.Errorf("round trip: Probe: %w", err)
		}
		lat = append(lat, d)
	}
	b.rttMs = quantile(lat, 0.5)
	var spawn []float64
	for range 50 {
		d, err := timed(func() error { return exec.CommandContext(ctx, "true").Run() })
		if err != nil {
			return fmt.Errorf("round trip: spawning true: %w", err)
		}
		spawn = append(spawn, d)
	}
	b.spawnMs = quantile(spawn, 0.5)
	b.add(
		summary("Probe round trip (gRPC over the unix socket)", lat, latency, nil),
		summary("reference: spawn and wait for true(1) from Go, the least each tool the driver runs costs", spawn, latency, nil),
	)
	return nil
}

// figureCreateDelete is figure 1: CreateVolume and DeleteVolume one at a
// time against a baseline doing the same file work by hand, then the rate
// of many concurrent callers against one.
func (b *bench) figureCreateDelete(ctx context.Context) error {
	base := filepath.Join(b.work, "baseline")
	if err := makeBaselineDirs(base, b.pool); err != nil {
		return err
	}
	seq, err := b.sequentialCreates(ctx, base)
	if err != nil {
		return err
	}
	conc, err := b.concurrentCreates(ctx, base)
	if err != nil {
		return err
	}
	b.addCreateRows(seq, conc)
	return nil
}

// makeBaselineDirs makes the baseline's directories next to the pool, on
// the same filesystem, so that both pay the same fsyncs.
func makeBaselineDirs(base, poolDir string) error {
	for _, d := range []string{".tmp", "volumes"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o750); err != nil {
			return fmt.Errorf("baseline: %w", err)
		}
	}
	same, err := sameFilesystem(base, poolDir)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	if !same {
		return fmt.Errorf("baseline %s is not on the filesystem of the pool %s", base, poolDir)
	}
	return nil
}

// baselineCreate does by hand the least a crash-safe CreateVolume must do:
// a sparse image (truncate), a small JSON metadata file, fsync of both,
// the temp directory renamed into place, and an fsync of its new parent.
func baselineCreate(base, name string) error {
	tmp := filepath.Join(base, ".tmp", name)
	if err := os.Mkdir(tmp, 0o750); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	img, err := os.OpenFile(filepath.Join(tmp, pool.ImageName), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	err = errors.Join(img.Truncate(thinBytes), img.Sync(), img.Close())
	if err != nil {
		return fmt.Errorf("baseline image: %w", err)
	}
	// The metadata is what the driver stores, so that it is as large.
	meta, err := json.MarshalIndent(pool.Volume{
		ID: "default:" + nodeID + ":000000000000000000000000", Name: name, CapacityBytes: thinBytes,
		Provisioning: pool.Thin, AccessType: pool.Mount, FSType: "ext4", CreatedAt: time.Now().UTC(),
	}, "", "  ")
	if err != nil {
		return fmt.Errorf("baseline metadata: %w", err)
	}
	mf, err := os.OpenFile(filepath.Join(tmp, pool.MetadataName), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	_, werr := mf.Write(meta)
	if err := errors.Join(werr, mf.Sync(), mf.Close()); err != nil {
		return fmt.Errorf("baseline metadata: %w", err)
	}
	volumes := pool.VolumesDir(base)
	if err := os.Rename(tmp, filepath.Join(volumes, name)); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	return syncDir(volumes)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// createRequest asks for a thin ext4 volume of thinBytes.
func createRequest(name string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:               name,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: thinBytes},
		VolumeCapabilities: []*csi.VolumeCapability{csiclient.MountCap("ext4")},
	}
}

// seqResult holds the one-at-a-time samples of figure 1, in milliseconds
// and volumes per second.
type seqResult struct {
	create, baseline, del []float64
	createRate, baseRate  []float64 // per window of consecutive calls
	driverCPUms           float64   // driver CPU per create
	baseCPUms             float64   // the bench's CPU per baseline create
}

// sequentialCreates creates and deletes cfg.seqVolumes volumes one at a
// time, interleaved with the baseline.
func (b *bench) sequentialCreates(ctx context.Context, base string) (seqResult, error) {
	var r seqResult
	ids := make([]string, 0, b.cfg.seqVolumes)
	cpu0, err := b.main.cpuSeconds()
	if err != nil {
		return r, err
	}
	// The baseline runs on this goroutine, locked to its thread, so that
	// the thread's CPU time is the baseline's.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var baseCPU time.Duration
	for i := range b.cfg.seqVolumes {
		name := fmt.Sprintf("seq-%04d", i)
		var bt float64
		cpu, err := threadCPU(func() error {
			var err error
			bt, err = timed(func() error { return baselineCreate(base, name) })
			return err
		})
		if err != nil {
			return r, errors.Join(err, b.deleteAll(ids))
		}
		baseCPU += cpu
		var id string
		ct, err := timed(func() error {
			resp, err := b.c.CreateVolume(ctx, createRequest(name))
			id = resp.GetVolume().GetVolumeId()
			return err
		})
		if err != nil {
			return r, errors.Join(fmt.Errorf("CreateVolume %s: %w", name, err), b.deleteAll(ids))
		}
		ids = append(ids, id)
		r.create, r.baseline = append(r.create, ct), append(r.baseline, bt)
	}
	cpu1, err := b.main.cpuSeconds()
	if err != nil {
		return r, errors.Join(err, b.deleteAll(ids))
	}
	r.driverCPUms = 1000 * (cpu1 - cpu0) / float64(len(ids))
	r.baseCPUms = ms(baseCPU) / float64(len(ids))
	for i, id := range ids {
		dt, err := timed(func() error {
			_, err := b.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		})
		if err != nil {
			return r, errors.Join(fmt.Errorf("DeleteVolume %s: %w", id, err), b.deleteAll(ids[i:]))
		}
		r.del = append(r.del, dt)
	}
	r.createRate = windowRates(r.create, b.cfg.rateRounds)
	r.baseRate = windowRates(r.baseline, b.cfg.rateRounds)
	return r, emptyBaseline(base)
}

// threadCPU runs fn and returns the CPU time the calling thread spent
// meanwhile; the caller has locked its goroutine to the thread.
func threadCPU(fn func() error) (time.Duration, error) {
	var before, after unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &before); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	if err := fn(); err != nil {
		return 0, err
	}
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &after); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	cpu := func(r unix.Rusage) time.Duration {
		return time.Duration(r.Utime.Nano() + r.Stime.Nano())
	}
	return cpu(after) - cpu(before), nil
}

// emptyBaseline removes the baseline's volumes.
func emptyBaseline(base string) error {
	volumes := pool.VolumesDir(base)
	if err := os.RemoveAll(volumes); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	if err := os.Mkdir(volumes, 0o750); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	return nil
}

// windowRates splits consecutive latencies (ms) into n windows and returns
// the calls per second of each: the rate of one caller.
func windowRates(lat []float64, n int) []float64 {
	var out []float64
	size := max(len(lat)/max(n, 1), 1)
	for i := 0; i+size <= len(lat); i += size {
		var sum float64
		for _, v := range lat[i : i+size] {
			sum += v
		}
		out = append(out, float64(size)/(sum/1000))
	}
	return out
}

// concResult holds the concurrent samples of figure 1.
type concResult struct {
	create, del, baseline []float64 // volumes per second, one sample per round
	busy                  []float64 // fraction of all CPUs busy during the creates
	driverCPU             []float64 // driver CPU seconds per second during the creates
}

// concurrentCreates runs cfg.rateRounds rounds of cfg.callers callers
// creating 10 volumes each, deletes them the same way, and does the same
// with the baseline.
func (b *bench) concurrentCreates(ctx context.Context, base string) (concResult, error) {
	var r concResult
	n := 10 * b.cfg.callers
	for round := range b.cfg.rateRounds {
		ids := make([]string, n)
		cpu0, err := readCPUTimes()
		if err != nil {
			return r, err
		}
		drv0, err := b.main.cpuSeconds()
		if err != nil {
			return r, err
		}
		start := time.Now()
		err = parallel(ctx, b.cfg.callers, n, func(ctx context.Context, i int) error {
			resp, err := b.c.CreateVolume(ctx, createRequest(fmt.Sprintf("conc-%d-%04d", round, i)))
			ids[i] = resp.GetVolume().GetVolumeId()
			return err
		})
		wall := time.Since(start).Seconds()
		if err != nil {
			return r, errors.Join(fmt.Errorf("concurrent CreateVolume: %w", err), b.deleteAll(ids))
		}
		cpu1, err1 := readCPUTimes()
		drv1, err2 := b.main.cpuSeconds()
		if err := errors.Join(err1, err2); err != nil {
			return r, errors.Join(err, b.deleteAll(ids))
		}
		r.create = append(r.create, float64(n)/wall)
		r.busy = append(r.busy, busyFraction(cpu0, cpu1))
		r.driverCPU = append(r.driverCPU, (drv1-drv0)/wall)

		start = time.Now()
		if err := b.deleteParallel(ctx, ids); err != nil {
			return r, err
		}
		r.del = append(r.del, float64(n)/time.Since(start).Seconds())

		start = time.Now()
		err = parallel(ctx, b.cfg.callers, n, func(_ context.Context, i int) error {
			return baselineCreate(base, fmt.Sprintf("conc-%d-%04d", round, i))
		})
		if err != nil {
			return r, err
		}
		r.baseline = append(r.baseline, float64(n)/time.Since(start).Seconds())
		if err := emptyBaseline(base); err != nil {
			return r, err
		}
	}
	return r, nil
}

func (b *bench) addCreateRows(s seqResult, c concResult) {
	createP50, baseP50 := quantile(s.create, 0.5), quantile(s.baseline, 0.5)
	ratio := row{figure: "CreateVolume p50 / baseline p50",
		median: createP50 / baseP50, slow: quantile(s.create, 0.9) / quantile(s.baseline, 0.9),
		kind: ratioLo, target: atMost(1.5, "≤ 1.5")}
	edge := min(20, len(s.create)/2)
	ratio.reason = fmt.Sprintf("the driver uses %s of CPU per create where the baseline's system calls use %s; "+
		"its creates take %s with the first %d volumes in the pool and %s with the last %d (the baseline: %s and %s); "+
		"a gRPC round trip is %s",
		formatMs(s.driverCPUms), formatMs(s.baseCPUms),
		formatMs(quantile(s.create[:edge], 0.5)), edge, formatMs(quantile(s.create[len(s.create)-edge:], 0.5)), edge,
		formatMs(quantile(s.baseline[:edge], 0.5)), formatMs(quantile(s.baseline[len(s.baseline)-edge:], 0.5)),
		formatMs(b.rttMs))

	one, many := quantile(s.createRate, 0.5), quantile(c.create, 0.5)
	scale := row{figure: fmt.Sprintf("CreateVolume rate, %d callers / 1 caller", b.cfg.callers),
		median: many / one, slow: quantile(c.create, 0.1) / quantile(s.createRate, 0.1),
		kind: ratioHi, target: atLeast(4, "≥ 4")}
	baseScale := quantile(c.baseline, 0.5) / quantile(s.baseRate, 0.5)
	scale.reason = scalingReason(quantile(c.busy, 0.5), quantile(c.driverCPU, 0.5), baseScale)

	b.add(
		summary("CreateVolume, 64 MiB thin, one caller", s.create, latency, nil),
		summary("baseline: truncate + JSON + 2 fsyncs + rename dir + fsync parent, by the bench on the pool filesystem", s.baseline, latency, nil),
		ratio,
		summary("DeleteVolume, one caller", s.del, latency, nil),
		summary("CreateVolume rate, 1 caller (per window of consecutive calls)", s.createRate, volRate, nil),
		summary(fmt.Sprintf("CreateVolume rate, %d callers", b.cfg.callers), c.create, volRate, nil),
		scale,
		summary(fmt.Sprintf("DeleteVolume rate, %d callers", b.cfg.callers), c.del, volRate, nil),
		row{figure: fmt.Sprintf("baseline rate, %d callers / 1 caller (what the filesystem and disk allow)", b.cfg.callers),
			median: baseScale, slow: quantile(c.baseline, 0.1) / quantile(s.baseRate, 0.1), kind: ratioHi},
	)
}

// scalingReason explains a concurrent rate that does not scale: CPU-bound
// (with two cores, three quarters busy is all the driver, the bench and the
// kernel's writeback leave), bound by the filesystem and disk (the baseline
// does not scale either), or serialised in the driver.
func scalingReason(busy, driverCores, baseScale float64) string {
	facts := fmt.Sprintf("CPUs %.0f%% busy, the driver alone %.2f cores; the baseline scales %.1f×", 100*busy, driverCores, baseScale)
	switch {
	case busy >= 0.75:
		return fmt.Sprintf("CPU-bound on %d cores (%s)", nproc(), facts)
	case baseScale < 4:
		return fmt.Sprintf("bound by fsync on one disk (%s)", facts)
	default:
		return fmt.Sprintf("serialised in the driver (%s)", facts)
	}
}

// deleteParallel deletes volumes with cfg.callers callers.
func (b *bench) deleteParallel(ctx context.Context, ids []string) error {
	return parallel(ctx, b.cfg.callers, len(ids), func(ctx context.Context, i int) error {
		if ids[i] == "" {
			return nil
		}
		if _, err := b.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: ids[i]}); err != nil {
			return fmt.Errorf("DeleteVolume %s: %w", ids[i], err)
		}
		return nil
	})
}

// deleteAll deletes volumes on the way out of a failed figure, with a
// context of its own so that it also runs after an interrupt.
func (b *bench) deleteAll(ids []string) error {
	if b.c == nil {
		return errors.New("volumes not deleted: the driver is not running (the temp dir goes anyway)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return retryAborted(ctx, func() error { return b.deleteParallel(ctx, ids) })
}

// timed runs fn and returns how long it took, in milliseconds.
func timed(fn func() error) (float64, error) {
	start := time.Now()
	err := fn()
	return ms(time.Since(start)), err
}

// parallel calls fn(ctx, i) for every i in [0, n) from workers goroutines
// and returns the first error; after an error the remaining calls are not
// made.
func parallel(ctx context.Context, workers, n int, fn func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := fn(ctx, i); err != nil {
					errOnce.Do(func() { firstErr = err })
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr == nil {
		// Set only when the caller's ctx was cancelled: some calls were
		// not made.
		return ctx.Err()
	}
	return firstErr
}
