// Package doctor checks that a node has what Spool needs before a pod
// needs it: loop devices, the filesystems and their tools, each pool
// (reflink, direct I/O, space, the lock, leftovers), the kubelet
// directory's mount propagation, the capability online ext4 growth needs,
// and loop devices left attached to pool images. Each check ends in a
// verdict and, when it is not ok, a fix. `spool doctor` prints them.
package doctor

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
)

// Verdict is a check's outcome. Fail means volumes cannot be served as
// configured; Warn that something works less well or may fail later.
type Verdict string

// The verdicts, in rising order of concern.
const (
	OK   Verdict = "ok"
	Warn Verdict = "warn"
	Fail Verdict = "fail"
)

// Result is one check's outcome.
type Result struct {
	Check   string  `json:"check"`
	Verdict Verdict `json:"verdict"`
	Detail  string  `json:"detail"`
	Fix     string  `json:"fix,omitempty"`
}

// System is what the checks read of the machine: the real one (Host), or
// a test's.
type System struct {
	// ProcFilesystems, MountInfo, Status and Locks are /proc/filesystems,
	// /proc/self/mountinfo, /proc/self/status and /proc/locks.
	ProcFilesystems, MountInfo, Status, Locks string
	// LoopControl returns the next free loop device (LOOP_CTL_GET_FREE).
	LoopControl func() (string, error)
	// LookPath finds a program; Version runs it to print its version.
	LookPath func(string) (string, error)
	Version  func(ctx context.Context, path string, args ...string) string
	// Loops lists the attached loop devices' backing files ("(deleted)"
	// suffix kept).
	Loops func() ([]string, error)
}

// Config is what to check.
type Config struct {
	Pools      pool.Specs
	KubeletDir string
}

// fsTools are each filesystem's programs the driver runs, and how its
// mkfs prints its version. ext4 is the default filesystem: without it no
// volume of the default StorageClasses can be made.
var fsTools = []struct {
	fs          string
	required    bool
	tools       []string
	versionArgs []string
	pkg         string
}{
	{"ext4", true, []string{"mkfs.ext4", "e2fsck", "resize2fs", "tune2fs", "dumpe2fs", "blkid"}, []string{"-V"}, "e2fsprogs"},
	{"xfs", false, []string{"mkfs.xfs", "xfs_growfs", "xfs_admin"}, []string{"-V"}, "xfsprogs"},
	{"btrfs", false, []string{"mkfs.btrfs", "btrfs"}, []string{"--version"}, "btrfs-progs"},
}

// Run runs every check.
func Run(ctx context.Context, sys System, cfg Config) []Result {
	var out []Result
	out = append(out, checkLoop(sys))
	out = append(out, checkFilesystems(ctx, sys)...)
	for _, spec := range cfg.Pools {
		out = append(out, checkPool(sys, spec)...)
	}
	out = append(out, checkPropagation(sys, cfg.KubeletDir), checkCapability(sys), checkOrphans(sys, cfg.Pools))
	return out
}

// Failed reports whether any result is a Fail.
func Failed(rs []Result) bool {
	return slices.ContainsFunc(rs, func(r Result) bool { return r.Verdict == Fail })
}

func checkLoop(sys System) Result {
	r := Result{Check: "loop devices"}
	dev, err := sys.LoopControl()
	if err != nil {
		r.Verdict, r.Detail = Fail, fmt.Sprintf("no free loop device: %v", err)
		r.Fix = "load the loop module (modprobe loop) and give the node plugin /dev (a privileged container with /dev mounted)"
		return r
	}
	r.Verdict, r.Detail = OK, "/dev/loop-control answers; next free device "+dev
	return r
}

func checkFilesystems(ctx context.Context, sys System) []Result {
	known := map[string]bool{}
	data, err := os.ReadFile(sys.ProcFilesystems)
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			known[f[len(f)-1]] = true
		}
	}
	var out []Result
	for _, ft := range fsTools {
		r := Result{Check: "filesystem " + ft.fs, Verdict: OK}
		bad := Warn
		if ft.required {
			bad = Fail
		}
		var missing []string
		mkfs := ""
		for i, t := range ft.tools {
			p, err := sys.LookPath(t)
			if err != nil {
				missing = append(missing, t)
			} else if i == 0 {
				mkfs = p
			}
		}
		var notes []string
		switch {
		case err != nil:
			notes = append(notes, fmt.Sprintf("cannot read %s: %v", sys.ProcFilesystems, err))
			r.Verdict = Warn
		case !known[ft.fs]:
			// Not registered yet: the module may load at the first mount.
			notes = append(notes, "not in /proc/filesystems (a module may still load at the first mount)")
			r.Verdict, r.Fix = Warn, "modprobe "+ft.fs
		default:
			notes = append(notes, "kernel: yes")
		}
		if len(missing) > 0 {
			notes = append(notes, "missing "+strings.Join(missing, ", "))
			r.Verdict, r.Fix = bad, "apt-get install "+ft.pkg+" (in the node image)"
		} else {
			notes = append(notes, ft.tools[0]+" "+sys.Version(ctx, mkfs, ft.versionArgs...))
		}
		r.Detail = strings.Join(notes, "; ")
		if r.Verdict != OK && !ft.required {
			r.Detail += "; StorageClasses with this fsType fail until then"
		}
		out = append(out, r)
	}
	return out
}

// checkPool checks one pool: that it exists and is a pool, whether a
// driver serves it, its space, leftovers, reflinks and direct I/O (both
// tried on a scratch file in the pool's own .tmp, removed again).
func checkPool(sys System, spec pool.Spec) []Result {
	name := "pool " + spec.Name
	fi, err := os.Lstat(spec.Dir)
	if err != nil || !fi.IsDir() {
		detail := fmt.Sprintf("%s is not a directory", spec.Dir)
		if err != nil {
			detail = err.Error()
		}
		return []Result{{Check: name, Verdict: Fail, Detail: detail,
			Fix: "create the directory (a local pool is initialised at the driver's first start), or mount the share (spool pool init for a new shared pool)"}}
	}
	if _, err := os.Lstat(filepath.Join(spec.Dir, "spool-pool.json")); err != nil {
		r := Result{Check: name, Verdict: Warn, Detail: spec.Dir + " holds no pool yet", Fix: "the driver initialises a local pool at its first start"}
		if spec.Shared {
			r.Verdict, r.Fix = Fail, "spool pool init "+spec.Name+"="+spec.Dir+" once, on one node (docs/shared-pools.md)"
		}
		return []Result{r}
	}
	var out []Result
	served, lockErr := lockHeld(sys.Locks, spec.Dir)
	switch {
	case lockErr != nil:
		out = append(out, Result{Check: name + ": lock", Verdict: Fail, Detail: lockErr.Error(), Fix: "the pool's .lock must be a regular file Spool can open"})
	case spec.Shared:
		// Controllers on any node hold the shared lock on the share;
		// /proc/locks shows only this machine's (and this PID
		// namespace's), and reading a shared pool needs no lock.
		out = append(out, Result{Check: name + ": lock", Verdict: OK, Detail: "shared pool: served by every controller that opens it (their locks on the share are not all visible here)"})
	case served:
		out = append(out, Result{Check: name + ": lock", Verdict: OK, Detail: "held: a driver serves the pool"})
	default:
		out = append(out, Result{Check: name + ": lock", Verdict: OK, Detail: "free: no process this doctor can see serves the pool (a driver in another container would not show)"})
	}
	// A shared pool is read without its lock; what is in its .tmp may be
	// another node's controller at work.
	out = append(out, checkSpace(spec, served && !spec.Shared), checkLeftovers(spec, served || spec.Shared))
	out = append(out, checkScratch(spec)...)
	return out
}

// lockHeld reports whether a process holds the pool's lock, from the
// kernel's table of locks (locks, /proc/locks): taking the lock to find out
// could make a driver that starts at that moment fail.
func lockHeld(locks, dir string) (bool, error) {
	path := filepath.Join(dir, ".lock")
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); errors.Is(err, unix.ENOENT) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, fmt.Errorf("%s is not a regular file", path)
	}
	data, err := os.ReadFile(locks)
	if err != nil {
		return false, err
	}
	// "1: FLOCK  ADVISORY  WRITE 1665 fe:00:9986155 0 EOF"
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[1] == "FLOCK" && f[5] == want {
			return true, nil
		}
	}
	return false, nil
}

func checkSpace(spec pool.Spec, served bool) Result {
	r := Result{Check: "pool " + spec.Name + ": space", Verdict: OK}
	var st unix.Statfs_t
	if err := unix.Statfs(spec.Dir, &st); err != nil {
		r.Verdict, r.Detail = Fail, err.Error()
		return r
	}
	free, total := int64(st.Bavail)*st.Bsize, int64(st.Blocks)*st.Bsize
	r.Detail = fmt.Sprintf("filesystem %s free of %s", size.Format(free), size.Format(total))
	if served {
		// The running driver holds the lock; its metrics have the rest.
		r.Detail += "; provisioned: spool_pool_provisioned_bytes of the serving driver"
	} else {
		// Read as spool volume list reads a pool no driver serves:
		// read-only, holding its lock for the moment it reads, never
		// waiting for it.
		ro := spec
		ro.ReadOnly, ro.Existing = true, true
		p, err := pool.Open(ro, "doctor")
		if err == nil {
			c, cerr := p.Capacity()
			p.Close()
			if cerr == nil {
				r.Detail += fmt.Sprintf("; capacity %s, provisioned %s, snapshots %s, available %s",
					size.Format(c.Total), size.Format(c.Provisioned), size.Format(c.Snapshots), size.Format(c.Available))
				if c.Unbacked > 0 {
					r.Verdict = Warn
					r.Fix = fmt.Sprintf("%s provisioned to thin volumes could not be written: free space on the filesystem, or lower capacity=", size.Format(c.Unbacked))
				}
			}
		}
	}
	if free < pool.MetadataReserve {
		r.Verdict, r.Fix = Fail, fmt.Sprintf("less than %s free: snapshots are refused and metadata writes may fail; free space on %s", size.Format(pool.MetadataReserve), spec.Dir)
	}
	return r
}

func checkLeftovers(spec pool.Spec, served bool) Result {
	r := Result{Check: "pool " + spec.Name + ": leftovers", Verdict: OK}
	var notes []string
	n := 0
	for _, d := range []string{".tmp", ".trash"} {
		entries, err := os.ReadDir(filepath.Join(spec.Dir, d))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			notes = append(notes, fmt.Sprintf("%s: %v", d, err))
			continue
		}
		if len(entries) > 0 {
			notes = append(notes, fmt.Sprintf("%d in %s", len(entries), d))
			n += len(entries)
		}
	}
	switch {
	case n == 0 && len(notes) == 0:
		r.Detail = "none in .tmp and .trash"
	case served:
		r.Detail = strings.Join(notes, ", ") + " (operations in flight, or removed at the driver's next start)"
	default:
		r.Verdict, r.Detail = Warn, strings.Join(notes, ", ")
		r.Fix = "interrupted operations left them; the driver's next start removes them"
	}
	return r
}

// checkScratch tries a reflink and an O_DIRECT write on scratch files in
// the pool's .tmp, and removes them.
func checkScratch(spec pool.Spec) []Result {
	reflink := Result{Check: "pool " + spec.Name + ": reflink"}
	direct := Result{Check: "pool " + spec.Name + ": direct I/O"}
	dir, err := os.MkdirTemp(filepath.Join(spec.Dir, ".tmp"), "doctor-")
	if err != nil {
		for _, r := range []*Result{&reflink, &direct} {
			r.Verdict, r.Detail = Warn, "not tried: "+err.Error()
		}
		return []Result{reflink, direct}
	}
	defer os.RemoveAll(dir)
	src, dst := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	err = os.WriteFile(src, bytes.Repeat([]byte{1}, 64<<10), 0o600)
	if err == nil {
		err = ficlone(src, dst)
	}
	switch {
	case err == nil:
		reflink.Verdict, reflink.Detail = OK, "yes: snapshots and clones are reflinks (instant, sharing space); changed block tracking reads extent maps"
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY):
		reflink.Verdict, reflink.Detail = OK, "no: snapshots and clones are sparse copies, in time and space in proportion to the data"
	default:
		reflink.Verdict, reflink.Detail = Warn, "could not try: "+err.Error()
	}
	if err := directWrite(filepath.Join(dir, "c")); err != nil {
		direct.Verdict, direct.Detail = Warn, "O_DIRECT refused: "+err.Error()
		direct.Fix = "loop devices then go through the page cache twice (the pool filesystem's and the volume's); put the pool on a filesystem with direct I/O (ext4, xfs, btrfs)"
	} else {
		direct.Verdict, direct.Detail = OK, "yes: loop devices read and write the images directly"
	}
	return []Result{reflink, direct}
}

func ficlone(src, dst string) error {
	s, err := os.Open(src)
	if err != nil {
		return err
	}
	defer s.Close()
	d, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.IoctlFileClone(int(d.Fd()), int(s.Fd()))
}

func directWrite(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|unix.O_DIRECT, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Munmap(buf) }()
	_, err = f.Write(buf)
	return err
}

// checkPropagation checks that the mount holding the kubelet directory is
// shared: Spool's mounts there must reach the kubelet and the pods.
func checkPropagation(sys System, kubeletDir string) Result {
	r := Result{Check: "mount propagation of " + kubeletDir}
	f, err := os.Open(sys.MountInfo)
	if err != nil {
		r.Verdict, r.Detail = Warn, err.Error()
		return r
	}
	defer f.Close()
	mounts, err := mountinfo.GetMountsFromReader(f, nil)
	if err != nil {
		r.Verdict, r.Detail = Warn, err.Error()
		return r
	}
	var best *mountinfo.Info
	for _, m := range mounts {
		if under(kubeletDir, m.Mountpoint) && (best == nil || len(m.Mountpoint) >= len(best.Mountpoint)) {
			best = m
		}
	}
	if best == nil {
		r.Verdict, r.Detail = Warn, "no mount holds it"
		return r
	}
	if strings.Contains(best.Optional, "shared:") {
		r.Verdict, r.Detail = OK, fmt.Sprintf("shared (%s, on %s)", best.Optional, best.Mountpoint)
		return r
	}
	r.Verdict, r.Detail = Fail, fmt.Sprintf("the mount on %s is private: volumes Spool mounts there would not reach the kubelet", best.Mountpoint)
	r.Fix = "on the host, mount --make-rshared " + best.Mountpoint + " (or bind the kubelet directory onto itself and make that shared: mount --bind " +
		kubeletDir + " " + kubeletDir + " && mount --make-rshared " + kubeletDir + "); in the node pod, mount it with mountPropagation: Bidirectional"
	return r
}

func under(path, dir string) bool {
	return path == dir || dir == "/" || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// checkCapability checks CAP_SYS_RESOURCE, which the kernel asks for when
// an ext4 filesystem grows while mounted.
func checkCapability(sys System) Result {
	r := Result{Check: "CAP_SYS_RESOURCE"}
	data, err := os.ReadFile(sys.Status)
	if err != nil {
		r.Verdict, r.Detail = Warn, err.Error()
		return r
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		hex, ok := strings.CutPrefix(sc.Text(), "CapEff:")
		if !ok {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
		if err != nil {
			break
		}
		if mask&(1<<unix.CAP_SYS_RESOURCE) != 0 {
			r.Verdict, r.Detail = OK, "held: mounted ext4 volumes grow online"
		} else {
			r.Verdict, r.Detail = Warn, "missing: a mounted ext4 volume cannot grow (offline growth, at the next stage, still works)"
			r.Fix = "run the node plugin privileged (deploy/ does)"
		}
		return r
	}
	r.Verdict, r.Detail = Warn, "no CapEff line in "+sys.Status
	return r
}

// checkOrphans reports loop devices backed by pool images whose backing
// file is gone: nothing can use them, and they keep the deleted image's
// blocks.
func checkOrphans(sys System, pools pool.Specs) Result {
	r := Result{Check: "loop devices of pool images"}
	files, err := sys.Loops()
	if err != nil {
		r.Verdict, r.Detail = Warn, err.Error()
		return r
	}
	n := 0
	var deleted []string
	for _, f := range files {
		name, gone := strings.CutSuffix(f, " (deleted)")
		for _, p := range pools {
			if under(name, p.Dir) {
				n++
				if gone {
					deleted = append(deleted, name)
				}
			}
		}
	}
	r.Verdict, r.Detail = OK, fmt.Sprintf("%d attached", n)
	if len(deleted) > 0 {
		r.Verdict = Warn
		r.Detail += fmt.Sprintf("; %d backed by a deleted image: %s", len(deleted), strings.Join(deleted, ", "))
		r.Fix = "unmount what uses them and detach them (losetup -d); the blocks of a deleted image are freed only then"
	}
	return r
}

// Print writes one line per result.
func Print(w io.Writer, rs []Result) {
	for _, r := range rs {
		line := fmt.Sprintf("%-4s  %-34s  %s", strings.ToUpper(string(r.Verdict)), r.Check, r.Detail)
		if r.Fix != "" {
			line += "\n      fix: " + r.Fix
		}
		fmt.Fprintln(w, line)
	}
}
