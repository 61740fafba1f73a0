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

func (builtinEngine) randRead(ctx context.Context, file string, size int64, d time.Duration, depth int) (float64, error) {
	const block = 4096
	f, err := os.OpenFile(file, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return 0, fmt.Errorf("random read: %w", err)
	}
	defer func() { _ = f.Close() }()
	bufs, free, err := alignedBuffer(depth * block)
	if err != nil {
		return 0, err
	}
	defer free()
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
				if _, err := f.ReadAt(buf, rng.Int64N(size/block)*block); err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("random read: %w", err) })
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

// figureDataPath is figure 4: sequential and random I/O on a file in a
// published ext4 volume against the same on a file in a plain directory of
// the pool's filesystem, alternating which goes first, with the page cache
// dropped before every run.
func (b *bench) figureDataPath(ctx context.Context) (err error) {
	eng, err := chooseEngine(b.cfg.engine)
	if err != nil {
		return err
	}
	b.facts.ioEngine = eng.name()
	size := int64(b.cfg.dataMiB) << 20
	files, undo, err := b.dataFiles(ctx, size)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, undo()) }()
	// Lay the files out first, so that every measured write overwrites
	// blocks that already exist, in the volume's image as in the plain file.
	for _, f := range files {
		if _, err := eng.seqWrite(ctx, f, size); err != nil {
			return err
		}
	}
	phases := b.dataPhases(eng, size)
	for round := range b.cfg.dataRounds {
		for _, p := range phases {
			if err := measurePair(ctx, p, files, round); err != nil {
				return err
			}
		}
	}
	for _, p := range phases {
		b.addDataRows(p)
	}
	return nil
}

// dataFiles publishes an ext4 volume twice the size of the test file and
// makes a plain directory on the pool's filesystem. It returns the test
// file in each and the function that undoes it.
func (b *bench) dataFiles(ctx context.Context, size int64) ([2]string, func() error, error) {
	var files [2]string
	plain := filepath.Join(b.work, "plain")
	if err := os.MkdirAll(plain, 0o750); err != nil {
		return files, nil, err
	}
	if same, err := sameFilesystem(plain, b.pool); err != nil || !same {
		return files, nil, fmt.Errorf("plain directory %s is not on the pool's filesystem (%v)", plain, err)
	}
	dir := filepath.Join(b.work, "data")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return files, nil, err
	}
	v, err := b.c.Create(ctx, "data", 2*size, csiclient.MountCap("ext4"), nil, nodeID, dir)
	if err != nil {
		if v != nil {
			err = errors.Join(err, discard(b.c, v))
		}
		return files, nil, err
	}
	undo := func() error { return discard(b.c, v) }
	if err := b.c.StageAndPublish(ctx, v); err != nil {
		return files, nil, errors.Join(err, undo())
	}
	files[0], files[1] = filepath.Join(v.Target, "bench.dat"), filepath.Join(plain, "bench.dat")
	return files, undo, nil
}

func (b *bench) dataPhases(eng ioEngine, size int64) []*dataPhase {
	depth, d := b.cfg.randDepth, b.cfg.randTime
	return []*dataPhase{
		{figure: fmt.Sprintf("sequential write, 1 MiB O_DIRECT, %d MiB", size>>20), kind: mibRate, target: atLeast(0.95, "≥ 0.95"), inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.seqWrite(ctx, f, size) }},
		{figure: fmt.Sprintf("sequential read, 1 MiB O_DIRECT, %d MiB", size>>20), kind: mibRate, target: atLeast(0.95, "≥ 0.95"), inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.seqRead(ctx, f, size) }},
		{figure: fmt.Sprintf("random read, 4 KiB O_DIRECT, %d in flight, %v", depth, d), kind: iops, target: atLeast(0.90, "≥ 0.90"),
			run: func(ctx context.Context, f string) (float64, error) { return eng.randRead(ctx, f, size, d, depth) }},
		{figure: fmt.Sprintf("random read, 4 KiB O_DIRECT, 1 in flight, %v", d), kind: iops, inFlight1: true,
			run: func(ctx context.Context, f string) (float64, error) { return eng.randRead(ctx, f, size, d, 1) }},
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

func (b *bench) addDataRows(p *dataPhase) {
	ratio := summary(p.figure+", volume / plain (paired per round)", p.ratios, ratioHi, p.target)
	busyVol, busyPlain := quantile(p.busy[0], 0.5), quantile(p.busy[1], 0.5)
	ratio.reason = fmt.Sprintf("CPUs %.0f%% busy during the volume runs, %.0f%% during the plain ones", 100*busyVol, 100*busyPlain)
	switch {
	case busyVol >= 0.85:
		ratio.reason = fmt.Sprintf("CPU-bound on %d cores: %s", nproc(), ratio.reason)
	case p.inFlight1:
		// One request in flight: rate = 1 / time per request, for MiB/s
		// of 1 MiB requests as for IOPS.
		vol, plain := 1000/quantile(p.samples[0], 0.5), 1000/quantile(p.samples[1], 0.5)
		ratio.reason = fmt.Sprintf("with one request in flight, each takes %s in the volume against %s in the plain file: the volume's extra layers (its ext4, the loop device) add latency that nothing overlaps; %s",
			formatMs(vol), formatMs(plain), ratio.reason)
	}
	b.add(
		summary(p.figure+", file in an ext4 volume", p.samples[0], p.kind, nil),
		summary(p.figure+", file in a plain directory of the pool filesystem", p.samples[1], p.kind, nil),
		ratio,
	)
}
