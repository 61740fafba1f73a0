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
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/test/csiclient"
)

// ioEngine runs the data-path measurements on one file.
type ioEngine interface {
	name() string
	// seqWrite writes size bytes in 1 MiB O_DIRECT writes from the start
	// of file (creating it), fsyncs it, and returns MiB/s.
	seqWrite(ctx context.Context, file string, size int64) (float64, error)
	// seqRead reads the file in 1 MiB O_DIRECT reads and returns MiB/s.
	seqRead(ctx context.Context, file string, size int64) (float64, error)
	// randRead reads random 4 KiB blocks of the file with O_DIRECT, depth at
	// a time, for d, and returns reads per second.
	randRead(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error)
	// randWrite does the same with writes, then fsyncs the file.
	randWrite(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error)
}

// chooseEngine returns fio when it is installed (or asked for), else the
// bench's own reader and writer.
func chooseEngine(want string) (ioEngine, error) {
	switch want {
	case "builtin":
		return builtinEngine{why: "asked for"}, nil
	case "fio", "auto":
		path, err := exec.LookPath("fio")
		if err != nil {
			if want == "fio" {
				return nil, fmt.Errorf("--io-engine fio: %w", err)
			}
			return builtinEngine{why: "fio not installed"}, nil
		}
		out, err := exec.Command(path, "--version").Output()
		if err != nil {
			return nil, fmt.Errorf("fio --version: %w", err)
		}
		return fioEngine{path: path, version: strings.TrimSpace(string(out))}, nil
	}
	return nil, fmt.Errorf("--io-engine %q: want auto, fio or builtin", want)
}

// fioEngine runs fio with the libaio engine.
type fioEngine struct{ path, version string }

func (e fioEngine) name() string { return e.version + " (libaio)" }

// fioResult is the part of fio's JSON output the bench reads.
type fioResult struct {
	Jobs []struct {
		Read  fioDir `json:"read"`
		Write fioDir `json:"write"`
	} `json:"jobs"`
}

type fioDir struct {
	BwBytes float64 `json:"bw_bytes"`
	IOPS    float64 `json:"iops"`
}

func (e fioEngine) run(ctx context.Context, file string, size int64, args ...string) (fioDir, fioDir, error) {
	args = append([]string{"--output-format=json", "--name=bench", "--filename=" + file,
		fmt.Sprintf("--size=%d", size), "--direct=1", "--ioengine=libaio"}, args...)
	out, err := exec.CommandContext(ctx, e.path, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return fioDir{}, fioDir{}, fmt.Errorf("fio %s: %w", strings.Join(args, " "), err)
	}
	// fio may print warnings before the JSON document.
	if i := strings.IndexByte(string(out), '{'); i > 0 {
		out = out[i:]
	}
	var r fioResult
	if err := json.Unmarshal(out, &r); err != nil || len(r.Jobs) != 1 {
		return fioDir{}, fioDir{}, fmt.Errorf("fio: unexpected output (%v): %.200s", err, out)
	}
	return r.Jobs[0].Read, r.Jobs[0].Write, nil
}

func (e fioEngine) seqWrite(ctx context.Context, file string, size int64) (float64, error) {
	_, w, err := e.run(ctx, file, size, "--rw=write", "--bs=1M", "--iodepth=1", "--end_fsync=1")
	return w.BwBytes / (1 << 20), err
}

func (e fioEngine) seqRead(ctx context.Context, file string, size int64) (float64, error) {
	r, _, err := e.run(ctx, file, size, "--rw=read", "--bs=1M", "--iodepth=1")
	return r.BwBytes / (1 << 20), err
}

func (e fioEngine) randRead(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error) {
	r, _, err := e.run(ctx, file, size, "--rw=randread", "--bs=4k", fmt.Sprintf("--iodepth=%d", depth),
		"--time_based", fmt.Sprintf("--runtime=%dms", d.Milliseconds()), "--norandommap", "--randrepeat=0")
	return r.IOPS, err
}

func (e fioEngine) randWrite(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error) {
	_, w, err := e.run(ctx, file, size, "--rw=randwrite", "--bs=4k", fmt.Sprintf("--iodepth=%d", depth),
		"--time_based", fmt.Sprintf("--runtime=%dms", d.Milliseconds()), "--norandommap", "--randrepeat=0", "--end_fsync=1")
	return w.IOPS, err
}

// builtinEngine does the same with plain pread/pwrite on O_DIRECT files;
// depth reads in flight are depth goroutines, each blocked in one pread.
type builtinEngine struct{ why string }

func (e builtinEngine) name() string { return "built-in O_DIRECT pread/pwrite (" + e.why + ")" }

const seqBlock = 1 << 20

func (builtinEngine) seqWrite(ctx context.Context, file string, size int64) (float64, error) {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DIRECT, 0o600)
	if err != nil {
		return 0, fmt.Errorf("sequential write: %w", err)
	}
	buf, free, err := alignedBuffer(seqBlock)
	if err != nil {
		return 0, errors.Join(err, f.Close())
	}
	defer free()
	_, _ = rand.NewChaCha8([32]byte{1}).Read(buf) // never fails
	start := time.Now()
	for off := int64(0); off < size; off += seqBlock {
		if err := ctx.Err(); err != nil {
			return 0, errors.Join(err, f.Close())
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			return 0, errors.Join(fmt.Errorf("sequential write: %w", err), f.Close())
		}
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return 0, fmt.Errorf("sequential write: %w", err)
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), nil
}

func (builtinEngine) seqRead(ctx context.Context, file string, size int64) (float64, error) {
	f, err := os.OpenFile(file, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return 0, fmt.Errorf("sequential read: %w", err)
	}
	defer func() { _ = f.Close() }()
	buf, free, err := alignedBuffer(seqBlock)
	if err != nil {
		return 0, err
	}
	defer free()
	start := time.Now()
	for off := int64(0); off < size; off += seqBlock {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if _, err := f.ReadAt(buf, off); err != nil {
			return 0, fmt.Errorf("sequential read: %w", err)
		}
	}
	return float64(size) / (1 << 20) / time.Since(start).Seconds(), nil
}

func (e builtinEngine) randRead(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error) {
	return e.random(ctx, file, size, d, depth, false)
}

func (e builtinEngine) randWrite(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error) {
	return e.random(ctx, file, size, d, depth, true)
}

// random keeps depth 4 KiB O_DIRECT reads (or writes, then an fsync) of
// random blocks in flight for d.
func (builtinEngine) random(ctx context.Context, file string, size int64, d time.Duration, depth int, write bool) (rate float64, err error) {
	const block = 4096
	flags, what := os.O_RDONLY, "random read"
	if write {
		flags, what = os.O_WRONLY, "random write"
	}
	f, err := os.OpenFile(file, flags|unix.O_DIRECT, 0)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	defer func() {
		if write {
			err = errors.Join(err, f.Sync())
		}
		err = errors.Join(err, f.Close())
	}()
	bufs, free, err := alignedBuffer(depth * block)
	if err != nil {
		return 0, err
	}
	defer free()
	if write {
		_, _ = rand.NewChaCha8([32]byte{2}).Read(bufs) // never fails
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var (
		reads    atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	start := time.Now()
	for w := range depth {
		buf := bufs[w*block : (w+1)*block]
		rng := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
		wg.Go(func() {
			for ctx.Err() == nil {
				off := rng.Int64N(size/block) * block
				var err error
				if write {
					_, err = f.WriteAt(buf, off)
				} else {
					_, err = f.ReadAt(buf, off)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("%s: %w", what, err) })
					return
				}
				reads.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(reads.Load()) / time.Since(start).Seconds(), firstErr
}

// dataPhase is one data-path measurement, made in the volume and in the
// plain directory.
type dataPhase struct {
	figure string
	kind   kind
	target *target
	run    func(ctx context.Context, file string) (float64, error)
	// inFlight1 marks a phase that keeps one request in flight, so that a
	// lower rate in the volume is a longer time per request.
	inFlight1 bool
	// samples: [0] the volume, [1] the plain directory; ratios pair the
	// two runs of a round; busy is the CPU use during each run.
	samples [2][]float64
	ratios  []float64
	busy    [2][]float64
}

// dataCase is one pool filesystem and one provisioning of the volume.
type dataCase struct{ fs, provisioning string }

func (c dataCase) String() string { return c.fs + " pool, " + c.provisioning + " volume" }

// figureDataPath is figure 4: for each pool filesystem (ext4, xfs, btrfs,
// each made on a loop device of its own) and each provisioning (thin,
// thick), sequential and random I/O on a file in a published ext4 volume
// against the same on a file in a plain directory of the pool filesystem,
// alternating which goes first, with the page cache dropped before every
// run. The first write into the volume's fresh file (into holes of a thin
// image, into preallocated extents of a thick one) is measured apart from
// the rewrites.
func (b *bench) figureDataPath(ctx context.Context) (err error) {
	eng, err := chooseEngine(b.cfg.engine)
	if err != nil {
		return err
	}
	b.facts.ioEngine = eng.name()
	size := int64(b.cfg.dpMiB) << 20
	var matrix []dataResult
	for _, fs := range strings.Split(b.cfg.dataPools, ",") {
		res, err := b.dataPool(ctx, eng, fs, size)
		matrix = append(matrix, res...)
		if err != nil {
			return fmt.Errorf("%s pool: %w", fs, err)
		}
	}
	b.dataMatrix = renderDataMatrix(matrix)
	return nil
}

// dataResult is what one case measured.
type dataResult struct {
	c                  dataCase
	firstVol, firstRaw float64 // MiB/s of the first write, volume and plain
	phases             []*dataPhase
}

// dataPool measures both provisionings on a scratch pool of type fs.
func (b *bench) dataPool(ctx context.Context, eng ioEngine, fs string, size int64) (out []dataResult, err error) {
	var undo cleanups
	defer func() { err = errors.Join(err, undo.run()) }()
	// The volume (twice the file), the plain file, and room to spare.
	c, poolDir, facts, err := b.startScratchPool(ctx, &undo, "data-"+fs, fs, 4*size+2<<30)
	if err != nil {
		return nil, err
	}
	b.facts.dataPools = append(b.facts.dataPools, fs+": "+facts)
	for _, prov := range []string{"thin", "thick"} {
		dc := dataCase{fs: fs, provisioning: prov}
		logf("data path: %s", dc)
		res, err := b.dataCaseRun(ctx, eng, c, poolDir, dc, size)
		if err != nil {
			return out, fmt.Errorf("%s: %w", dc, err)
		}
		out = append(out, res)
		b.addDataRows(res)
	}
	return out, nil
}

// dataCaseRun publishes an ext4 volume twice the size of the test file,
// provisioned as dc says, and makes a plain directory on the pool's
// filesystem; times the first write of the file in each, then the rounds.
func (b *bench) dataCaseRun(ctx context.Context, eng ioEngine, c *csiclient.Client, poolDir string, dc dataCase, size int64) (res dataResult, err error) {
	res.c = dc
	plain := filepath.Join(filepath.Dir(poolDir), "plain-"+dc.provisioning)
	if err := os.MkdirAll(plain, 0o750); err != nil {
		return res, err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(plain)) }()
	dir := filepath.Join(b.work, "data-"+dc.fs+"-"+dc.provisioning)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return res, err
	}
	v, err := c.Create(ctx, "data-"+dc.provisioning, 2*size, csiclient.MountCap("ext4"),
		map[string]string{"provisioning": dc.provisioning}, nodeID, dir)
	if err != nil {
		if v != nil {
			err = errors.Join(err, discard(c, v))
		}
		return res, err
	}
	defer func() { err = errors.Join(err, discard(c, v)) }()
	if err := c.StageAndPublish(ctx, v); err != nil {
		return res, err
	}
	files := [2]string{filepath.Join(v.Target, "bench.dat"), filepath.Join(plain, "bench.dat")}
	// The first write of each file; every later write overwrites allocated
	// blocks, in the volume's image as in the plain file.
	for k, f := range files {
		if err := dropCaches(); err != nil {
			return res, err
		}
		mib, err := eng.seqWrite(ctx, f, size)
		if err != nil {
			return res, err
		}
		if k == 0 {
			res.firstVol = mib
		} else {
			res.firstRaw = mib
		}
	}
	res.phases = b.dataPhases(eng, size)
	for round := range b.cfg.dpRounds {
		for _, p := range res.phases {
			if err := measurePair(ctx, p, files, round); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

func (b *bench) dataPhases(eng ioEngine, size int64) []*dataPhase {
	depth, d := b.cfg.randDepth, b.cfg.randTime
	return []*dataPhase{
		{figure: fmt.Sprintf("sequential write, 1 MiB, %d MiB", size>>20), kind: mibRate, target: atLeast(0.95, "≥ 0.95"), inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.seqWrite(ctx, f, size) }},
		{figure: fmt.Sprintf("sequential read, 1 MiB, %d MiB", size>>20), kind: mibRate, target: atLeast(0.95, "≥ 0.95"), inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.seqRead(ctx, f, size) }},
		{figure: fmt.Sprintf("random read, 4 KiB, %d in flight", depth), kind: iops, target: atLeast(0.90, "≥ 0.90"),
			run: func(ctx context.Context, f string) (float64, error) { return eng.randRead(ctx, f, size, d, depth) }},
		{figure: "random read, 4 KiB, 1 in flight", kind: iops, inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.randRead(ctx, f, size, d, 1) }},
		{figure: fmt.Sprintf("random write, 4 KiB, %d in flight", depth), kind: iops, target: atLeast(0.90, "≥ 0.90"),
			run: func(ctx context.Context, f string) (float64, error) { return eng.randWrite(ctx, f, size, d, depth) }},
		{figure: "random write, 4 KiB, 1 in flight", kind: iops, inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.randWrite(ctx, f, size, d, 1) }},
	}
}

// measurePair runs a phase on both files, the volume first in even rounds
// and the plain file first in odd ones.
func measurePair(ctx context.Context, p *dataPhase, files [2]string, round int) error {
	order := []int{0, 1}
	if round%2 == 1 {
		order = []int{1, 0}
	}
	var v [2]float64
	for _, k := range order {
		if err := dropCaches(); err != nil {
			return err
		}
		cpu0, err := readCPUTimes()
		if err != nil {
			return err
		}
		if v[k], err = p.run(ctx, files[k]); err != nil {
			return err
		}
		cpu1, err := readCPUTimes()
		if err != nil {
			return err
		}
		p.busy[k] = append(p.busy[k], busyFraction(cpu0, cpu1))
	}
	p.samples[0], p.samples[1] = append(p.samples[0], v[0]), append(p.samples[1], v[1])
	p.ratios = append(p.ratios, v[0]/v[1])
	return nil
}

// addDataRows adds the volume / plain ratio of each phase of a case to the
// table (the rates themselves are in the figure 4 matrix).
func (b *bench) addDataRows(res dataResult) {
	for _, p := range res.phases {
		ratio := summary(fmt.Sprintf("%s, O_DIRECT, %s: volume / plain (paired per round)", p.figure, res.c), p.ratios, ratioHi, p.target)
		busyVol, busyPlain := quantile(p.busy[0], 0.5), quantile(p.busy[1], 0.5)
		ratio.reason = fmt.Sprintf("CPUs %.0f%% busy during the volume runs, %.0f%% during the plain ones", 100*busyVol, 100*busyPlain)
		switch {
		case busyVol >= 0.85:
			ratio.reason = fmt.Sprintf("CPU-bound on %d cores: %s", nproc(), ratio.reason)
		case p.inFlight1:
			// One request in flight: rate = 1 / time per request, for
			// MiB/s of 1 MiB requests as for IOPS.
			vol, plain := 1000/quantile(p.samples[0], 0.5), 1000/quantile(p.samples[1], 0.5)
			ratio.reason = fmt.Sprintf("with one request in flight, each takes %s in the volume against %s in the plain file: the volume's extra layers (its ext4, the loop device) add latency that nothing overlaps; %s",
				formatMs(vol), formatMs(plain), ratio.reason)
		}
		b.add(ratio)
	}
}

// renderDataMatrix prints figure 4's rates: one row per phase, one column
// per case, each cell "volume / plain (ratio)", medians.
func renderDataMatrix(results []dataResult) string {
	if len(results) == 0 {
		return ""
	}
	var w strings.Builder
	w.WriteString("| figure 4, medians: volume / plain (ratio) |")
	for _, r := range results {
		fmt.Fprintf(&w, " %s, %s |", r.c.fs, r.c.provisioning)
	}
	w.WriteString("\n|---|")
	w.WriteString(strings.Repeat("---|", len(results)))
	w.WriteString("\n| first write, 1 MiB (MiB/s) |")
	for _, r := range results {
		fmt.Fprintf(&w, " %.0f / %.0f (%.2f×) |", r.firstVol, r.firstRaw, r.firstVol/r.firstRaw)
	}
	for i, p := range results[0].phases {
		fmt.Fprintf(&w, "\n| %s |", p.figure)
		for _, r := range results {
			q := r.phases[i]
			fmt.Fprintf(&w, " %s / %s (%.2f×) |", q.kind.show(quantile(q.samples[0], 0.5)), q.kind.show(quantile(q.samples[1], 0.5)), quantile(q.ratios, 0.5))
		}
	}
	w.WriteString("\n| first write / rewrite in the volume |")
	for _, r := range results {
		fmt.Fprintf(&w, " %.2f× |", r.firstVol/quantile(r.phases[0].samples[0], 0.5))
	}
	w.WriteString("\n")
	return w.String()
}
