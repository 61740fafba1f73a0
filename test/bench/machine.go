package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/fs"
)

// facts describe the machine and the run, printed next to the table.
type facts struct {
	nproc      int
	cpuModel   string
	memTotal   string
	kernel     string
	poolFS     string
	loadBefore string
	loadAfter  string
	spool      string
	ioEngine   string
	goVersion  string
	wall       string
	xfsPool    string
	dataPools  []string // figure 4's pool filesystems
}

func collectFacts(spool, poolDir string) facts {
	f := facts{
		nproc:      nproc(),
		cpuModel:   firstField("/proc/cpuinfo", "model name"),
		memTotal:   gib(firstField("/proc/meminfo", "MemTotal")),
		kernel:     kernelRelease(),
		poolFS:     filesystemOf(poolDir),
		loadBefore: loadavg(),
		goVersion:  runtime.Version(),
	}
	if out, err := exec.Command(spool, "--version").Output(); err == nil {
		f.spool = strings.TrimSpace(string(out))
	}
	return f
}

// gib turns "24683620 kB" into "23.5 GiB".
func gib(kB string) string {
	n, err := parseKB(kB)
	if err != nil {
		return kB
	}
	return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
}

// nproc counts the CPUs the bench may run on, like nproc(1).
func nproc() int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return runtime.NumCPU()
	}
	return set.Count()
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// loadavg returns the three load averages of /proc/loadavg.
func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// firstField returns the value of the first "key : value" line of a /proc
// file.
func firstField(path, key string) string {
	file, err := os.Open(path)
	if err != nil {
		return "unknown"
	}
	defer func() { _ = file.Close() }()
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// filesystemOf describes the filesystem holding path: type, device and
// mount options of the deepest mount that contains it.
func filesystemOf(path string) string {
	mounts, err := fs.Mounts()
	if err != nil {
		return "unknown"
	}
	var best fs.MountInfo
	for _, m := range mounts {
		if under(path, m.MountPoint) && len(m.MountPoint) >= len(best.MountPoint) {
			best = m
		}
	}
	if best.MountPoint == "" {
		return "unknown"
	}
	return fmt.Sprintf("%s on %s (mounted at %s, %s)", best.FsType, best.Source, best.MountPoint, strings.Join(best.MountOptions, ","))
}

// sameFilesystem reports whether a and b lie on one filesystem.
func sameFilesystem(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev, nil
}

// dropCaches writes back dirty data and empties the page cache, dentries
// and inodes, so that a phase neither reads what the previous one cached
// nor pays for what it left to write back.
func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		return fmt.Errorf("dropping caches: %w", err)
	}
	return nil
}

// cpuTimes is the first line of /proc/stat: ticks spent by all CPUs.
type cpuTimes struct{ busy, total uint64 }

func readCPUTimes() (cpuTimes, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, fmt.Errorf("reading /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var t cpuTimes
	// Fields: user nice system idle iowait irq softirq steal, then guest
	// times that user and nice already include.
	for i, s := range f[1:min(len(f), 9)] {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return cpuTimes{}, fmt.Errorf("/proc/stat: %w", err)
		}
		t.total += n
		if i != 3 && i != 4 { // idle and iowait
			t.busy += n
		}
	}
	return t, nil
}

// busyFraction returns how busy all CPUs were between a and b, 0..1.
func busyFraction(a, b cpuTimes) float64 {
	if b.total <= a.total {
		return 0
	}
	return float64(b.busy-a.busy) / float64(b.total-a.total)
}
