// Command bench measures Spool: control-plane latencies and rates, node
// stage and publish, snapshots, the data path of a volume against the pool's
// own filesystem, and a pool of many volumes. It starts bin/spool as a child
// process on a pool under a temp dir, talks CSI to it over its socket, and
// prints a Markdown report (progress goes to stderr). It needs root: loop
// devices, mounts and dropping the page cache.
//
// `make bench` runs it through hack/bench.sh, which writes the report to
// docs/performance.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spool-csi/spool/test/csiclient"
)

// config holds the sizes and counts of every figure.
type config struct {
	spool   string
	tmpRoot string
	keep    bool
	engine  string // auto, fio or builtin
	quick   bool
	only    string // figures to run, e.g. "1,5"; empty: all

	seqVolumes  int // figure 1: sequential creates and deletes
	callers     int // figure 1 and 5: concurrent callers
	rateRounds  int // figure 1: rounds of concurrent creates
	stageIters  int // figure 2
	snapRuns    int // figure 3
	snapDataMiB int
	cbtGiB      int
	dataMiB     int    // figure 6: size of the sequential file
	dpMiB       int    // figure 4: size of the file
	dpRounds    int    // figure 4: rounds
	dataPools   string // figure 4: pool filesystems, comma-separated
	dataRounds  int
	randTime    time.Duration
	randDepth   int
	scaleVols   int // figure 5
	restarts    int
}

func parseFlags() config {
	var c config
	flag.StringVar(&c.spool, "spool", "bin/spool", "the driver binary")
	flag.StringVar(&c.tmpRoot, "tmp", os.TempDir(), "directory for the temp dir holding the pool (its filesystem is the one measured)")
	flag.BoolVar(&c.keep, "keep", false, "keep the temp dir (logs, pool) after the run")
	flag.StringVar(&c.engine, "io-engine", "auto", "data path engine: fio, builtin, or auto (fio when installed)")
	flag.IntVar(&c.seqVolumes, "seq-volumes", 200, "figure 1: sequential CreateVolume/DeleteVolume calls")
	flag.IntVar(&c.callers, "callers", 16, "figures 1 and 5: concurrent callers")
	flag.IntVar(&c.rateRounds, "rate-rounds", 5, "figure 1: rounds of concurrent creates (10 volumes per caller each)")
	flag.IntVar(&c.stageIters, "stage-iterations", 20, "figure 2: iterations of each node call")
	flag.IntVar(&c.snapRuns, "snapshot-runs", 3, "figure 3: snapshots and restores per pool")
	flag.IntVar(&c.snapDataMiB, "snapshot-data-mib", 512, "figure 3: random data in the 1 GiB volume")
	flag.IntVar(&c.cbtGiB, "cbt-gib", 10, "figure 7: size of the volume")
	flag.IntVar(&c.dataMiB, "data-mib", 1024, "figure 6: size of the sequential file")
	flag.IntVar(&c.dataRounds, "data-rounds", 7, "figure 6: rounds of each measurement")
	flag.IntVar(&c.dpMiB, "data-path-mib", 2048, "figure 4: size of the file in the volume and in the plain directory")
	flag.IntVar(&c.dpRounds, "data-path-rounds", 5, "figure 4: rounds of each measurement")
	flag.StringVar(&c.dataPools, "data-pools", "ext4,xfs,btrfs", "figure 4: the pool filesystems to measure")
	flag.DurationVar(&c.randTime, "rand-time", 2*time.Second, "figure 4: duration of one random run")
	flag.IntVar(&c.randDepth, "rand-depth", 16, "figure 4: random requests in flight")
	flag.IntVar(&c.scaleVols, "scale-volumes", 1000, "figure 5: volumes in the pool")
	flag.IntVar(&c.restarts, "restarts", 6, "figure 5: driver restarts (alternately with the page cache dropped and warm)")
	flag.BoolVar(&c.quick, "quick", false, "tiny counts, to check the bench itself")
	flag.StringVar(&c.only, "figures", "", "comma-separated figure numbers to measure, e.g. 1,5 (default: all)")
	flag.Parse()
	if c.quick {
		c.seqVolumes, c.rateRounds, c.stageIters, c.snapRuns, c.snapDataMiB, c.cbtGiB = 20, 2, 3, 1, 64, 1
		c.dataMiB, c.dataRounds, c.randTime, c.scaleVols, c.restarts = 64, 2, time.Second, 100, 2
		c.dpMiB, c.dpRounds = 64, 2
	}
	return c
}

func main() { os.Exit(realMain()) }

func realMain() int {
	cfg := parseFlags()
	// The first SIGINT or SIGTERM cancels ctx: the running figure stops
	// and everything is torn down. Later ones are swallowed until the bench
	// exits, so that the teardown is not cut short.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	report, err := run(ctx, cfg)
	fmt.Print(report)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// bench is one run.
type bench struct {
	cfg   config
	spool string
	work  string // the temp dir; everything the bench makes lies below it
	pool  string // the main driver's pool directory
	start time.Time

	main *driverProc       // the driver serving pool
	c    *csiclient.Client // its connection
	undo cleanups

	rows  []row
	facts facts
	// dataMatrix is figure 4's rates per pool filesystem and provisioning.
	dataMatrix string
	peakRSS    int64   // highest VmHWM of all driver processes so far
	rttMs      float64 // median Probe round trip, to explain control-plane figures
	spawnMs    float64 // median time to run true(1), to explain node figures
}

func run(ctx context.Context, cfg config) (report string, err error) {
	if os.Geteuid() != 0 {
		return "", errors.New("must run as root: it attaches loop devices, mounts filesystems and drops the page cache")
	}
	spool, err := filepath.Abs(cfg.spool)
	if err != nil {
		return "", fmt.Errorf("driver binary: %w", err)
	}
	if _, err := os.Stat(spool); err != nil {
		return "", fmt.Errorf("driver binary (run make build): %w", err)
	}
	b := &bench{cfg: cfg, spool: spool, start: time.Now()}
	work, err := os.MkdirTemp(cfg.tmpRoot, "spool-bench.")
	if err != nil {
		return "", fmt.Errorf("creating temp dir: %w", err)
	}
	// Mount points and loop backing files are reported with resolved
	// paths; so must the prefix they are matched against be.
	if b.work, err = filepath.EvalSymlinks(work); err != nil {
		return "", errors.Join(fmt.Errorf("resolving %s: %w", work, err), os.Remove(work))
	}
	b.pool = filepath.Join(b.work, "pool")
	defer func() { err = errors.Join(err, b.teardown()) }()
	b.undo.add("stop main driver", b.stopMain)

	b.facts = collectFacts(spool, b.work)
	logf("temp dir %s on %s", b.work, b.facts.poolFS)
	if _, err := b.startMain(ctx); err != nil {
		return "", err
	}
	failed := b.runFigures(ctx)
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("interrupted: %w", err)
	}
	if err := b.stopMain(); err != nil {
		return "", err
	}
	b.rows = append(b.rows, row{figure: "driver peak RSS (VmHWM), highest of all driver processes of the run",
		median: float64(b.peakRSS), slow: float64(b.peakRSS), kind: memory})
	b.facts.loadAfter = loadavg()
	b.facts.wall = time.Since(b.start).Round(time.Second).String()
	report = b.render()
	if len(failed) > 0 {
		return report, fmt.Errorf("figures failed: %s", strings.Join(failed, ", "))
	}
	return report, nil
}

// runFigures measures every figure in turn and returns the names of those
// that failed. A failed figure is reported in the table and the others still
// run.
func (b *bench) runFigures(ctx context.Context) (failed []string) {
	figures := []struct {
		num  string
		name string
		run  func(context.Context) error
	}{
		{"0", "gRPC round trip", b.figureRoundTrip}, // always: the others' reasons use it
		{"1", "1. CreateVolume and DeleteVolume", b.figureCreateDelete},
		{"2", "2. node stage and publish", b.figureStage},
		{"3", "3. snapshots", b.figureSnapshots},
		{"4", "4. data path", b.figureDataPath},
		{"5", "5. scale", b.figureScale},
		{"6", "6. encryption at rest", b.figureEncryption},
		{"7", "7. changed block tracking", b.figureCBT},
	}
	only := strings.Split(b.cfg.only, ",")
	for _, f := range figures {
		if ctx.Err() != nil {
			return failed
		}
		if b.cfg.only != "" && f.num != "0" && !slices.Contains(only, f.num) {
			continue
		}
		logf("== %s", f.name)
		if err := f.run(ctx); err != nil {
			logf("%s failed: %v", f.name, err)
			b.rows = append(b.rows, row{figure: f.name, err: err})
			failed = append(failed, f.name)
			if err := b.reviveMain(ctx); err != nil {
				logf("could not restart the driver: %v", err)
				return append(failed, "(remaining figures)")
			}
		}
	}
	return failed
}

// add appends rows to the table.
func (b *bench) add(rows ...row) { b.rows = append(b.rows, rows...) }

// startMain starts the driver on the main pool and connects to it. It returns
// the time from process start to the first ready Probe.
func (b *bench) startMain(ctx context.Context) (time.Duration, error) {
	d, err := startDriver(b.spool, "main", filepath.Join(b.work, "main"), b.pool)
	if err != nil {
		return 0, err
	}
	b.main = d
	ready, err := d.waitReady(ctx, 30*time.Second)
	if err != nil {
		return 0, err
	}
	if b.c, err = csiclient.Dial(d.endpoint); err != nil {
		return 0, err
	}
	return ready, nil
}

// stopMain closes the connection and stops the main driver.
func (b *bench) stopMain() error {
	if b.main == nil {
		return nil
	}
	var errs []error
	if b.c != nil {
		errs = append(errs, b.c.Close())
		b.c = nil
	}
	errs = append(errs, b.main.stop())
	b.peakRSS = max(b.peakRSS, b.main.peakRSS)
	b.main = nil
	return errors.Join(errs...)
}

// restartMain stops the main driver and starts it again, with the page
// cache dropped in between when cold. It returns the start-up time.
func (b *bench) restartMain(ctx context.Context, cold bool) (time.Duration, error) {
	if err := b.stopMain(); err != nil {
		return 0, err
	}
	if cold {
		if err := dropCaches(); err != nil {
			return 0, err
		}
	}
	return b.startMain(ctx)
}

// reviveMain starts the main driver again after a failed figure if it
// died, so that the later figures can run.
func (b *bench) reviveMain(ctx context.Context) error {
	if b.main != nil {
		// A killed driver breaks the connection a moment before its
		// exit status is collected.
		select {
		case <-b.main.done:
		case <-time.After(time.Second):
			return nil // still running
		}
		logf("restarting the driver: %v", b.stopMain())
	}
	_, err := b.startMain(ctx)
	return err
}

// teardown runs the undo steps (which stop the drivers), sweeps up any
// mount or loop device left under the temp dir, and removes it.
func (b *bench) teardown() error {
	err := b.undo.run()
	cleaned, serr := sweep(b.work)
	for _, c := range cleaned {
		logf("cleanup: %s (left behind)", c)
	}
	if serr != nil {
		// Never remove a tree that still has something mounted in it.
		return errors.Join(err, serr, fmt.Errorf("left %s in place", b.work))
	}
	if b.cfg.keep {
		logf("kept %s", b.work)
		return err
	}
	return errors.Join(err, os.RemoveAll(b.work))
}

// logf prints progress to stderr with the time since the bench started.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%7.1fs] %s\n", time.Since(processStart).Seconds(), fmt.Sprintf(format, args...))
}

var processStart = time.Now()
