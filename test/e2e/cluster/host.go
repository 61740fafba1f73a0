package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sysctls kubelet, kube-proxy and the CNI bridge change; teardown puts them back.
var hostSysctls = []string{"net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet", "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

// Directories outside the work directory that kubelet, containerd and the
// CNI plugins write to. Teardown removes what appeared in them.
var hostDirs = []string{"/var/log/pods", "/var/log/containers", "/var/lib/cni", "/run/netns", "/run/containerd", "/var/lib/spool"}

// hostState is what the host looked like before the cluster started.
// It is also written to stateFile while the cluster runs, so that a run
// that died without its teardown (a panic, SIGKILL) is cleaned up by the
// next one.
type hostState struct {
	WorkDir          string                     `json:"workDir"`
	Containerd       string                     `json:"containerd"`
	KubeletRoot      string                     `json:"kubeletRoot"`
	KubeletRootNew   bool                       `json:"kubeletRootNew"`
	BoundKubeletRoot bool                       `json:"boundKubeletRoot"`
	Sysctls          map[string]string          `json:"sysctls"`
	Iptables         map[string]string          `json:"iptables"` // command -> saved rules
	Entries          map[string]map[string]bool `json:"entries"`
	Existed          map[string]bool            `json:"existed"`
}

// stateFile records the host state of the running cluster.
const stateFile = "/run/spool-e2e-cluster.json"

func (h *hostState) save() error {
	b, err := json.Marshal(h)
	if err != nil {
		return fmt.Errorf("encode host state: %w", err)
	}
	if err := os.WriteFile(stateFile+".tmp", b, 0o600); err != nil {
		return fmt.Errorf("write host state: %w", err)
	}
	return os.Rename(stateFile+".tmp", stateFile)
}

// CleanStale tears down what a previous run left when it died before its
// teardown: it kills the pods and containerd shims, unmounts, detaches the
// loop devices of its work directory and puts the host state back.
func CleanStale(ctx context.Context, logf func(string, ...any)) error {
	b, err := os.ReadFile(stateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", stateFile, err)
	}
	var h hostState
	if err := json.Unmarshal(b, &h); err != nil {
		return fmt.Errorf("decode %s: %w", stateFile, err)
	}
	logf("cleaning up after a run that did not tear down (work directory %s)", h.WorkDir)
	errs := []error{killCgroupProcs("kubepods"), killShims(h.Containerd), killUnder(h.WorkDir)}
	errs = append(errs, h.restore(ctx))
	if _, err := DetachLoopsUnder(ctx, h.WorkDir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := removeChecked(h.WorkDir); err != nil {
		return err
	}
	return os.Remove(stateFile)
}

// killUnder kills processes whose executable or arguments name dir: the
// host processes of a dead run (kubelet, spool, containerd, ...).
func killUnder(dir string) error {
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	self := os.Getpid()
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		if pid, err := strconv.Atoi(strings.Split(p, "/")[2]); err == nil && pid != self {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// LoopsUnder lists the loop devices (losetup -a lines) backed by files
// below dir.
func LoopsUnder(ctx context.Context, dir string) ([]string, error) {
	out, err := run(ctx, "losetup", "-a")
	if err != nil {
		return nil, err
	}
	var loops []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, dir+"/") {
			loops = append(loops, l)
		}
	}
	return loops, nil
}

// DetachLoopsUnder detaches the loop devices backed by files below dir and
// returns what it found attached.
func DetachLoopsUnder(ctx context.Context, dir string) ([]string, error) {
	loops, err := LoopsUnder(ctx, dir)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, l := range loops {
		dev, _, _ := strings.Cut(l, ":")
		if _, err := run(ctx, "losetup", "-d", dev); err != nil {
			errs = append(errs, err)
		}
	}
	return loops, errors.Join(errs...)
}

func saveHostState(ctx context.Context, workDir, containerd, kubeletRoot string) (*hostState, error) {
	h := &hostState{WorkDir: workDir, Containerd: containerd, KubeletRoot: kubeletRoot, Sysctls: map[string]string{}, Iptables: map[string]string{},
		Entries: map[string]map[string]bool{}, Existed: map[string]bool{}}
	if mounts, err := mountsUnder(kubeletRoot); err != nil {
		return nil, err
	} else if len(mounts) > 0 {
		return nil, fmt.Errorf("%s already has mounts (%s): another kubelet uses it", kubeletRoot, strings.Join(mounts, ", "))
	}
	if _, err := os.Stat(kubeletRoot); errors.Is(err, os.ErrNotExist) {
		h.KubeletRootNew = true
	}
	for _, s := range hostSysctls {
		if b, err := os.ReadFile("/proc/sys/" + s); err == nil {
			h.Sysctls[s] = strings.TrimSpace(string(b))
		}
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		if _, err := exec.LookPath(cmd); err != nil {
			continue
		}
		out, err := run(ctx, cmd)
		if err != nil {
			return nil, fmt.Errorf("save firewall rules: %w", err)
		}
		h.Iptables[cmd] = out
	}
	for _, d := range append(hostDirs, kubeletRoot) {
		names, err := readDirNames(d)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		h.Existed[d] = true
		h.Entries[d] = map[string]bool{}
		for _, n := range names {
			h.Entries[d][n] = true
		}
	}
	return h, h.save()
}

func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", dir, err)
	}
	return names, nil
}

// Stop tears the cluster down and puts the host back as it was. It goes on
// after an error and returns all of them.
func (c *Cluster) Stop(ctx context.Context) error {
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	t0 := time.Now()
	if p := c.procs["kubelet"]; p != nil && !p.Exited() {
		// Let kubelet unmount and remove what pods still hold.
		if out, err := c.Kubectl(ctx, "get", "pods", "-A", "-o", "name"); err == nil && strings.TrimSpace(out) != "" {
			_, err := c.Kubectl(ctx, "delete", "pods", "--all", "-A", "--wait", "--timeout=60s")
			note(err)
		}
	}
	for _, name := range []string{"kubelet"} {
		if p := c.procs[name]; p != nil {
			note(p.Stop(15 * time.Second))
		}
	}
	note(killCgroupProcs("kubepods"))
	if p := c.procs["containerd"]; p != nil {
		note(p.Stop(15 * time.Second))
		note(killShims(c.containerd))
	}
	for _, name := range []string{"kube-proxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		if p := c.procs[name]; p != nil {
			note(p.Stop(15 * time.Second))
		}
	}
	if c.host != nil {
		if err := c.host.restore(ctx); err != nil {
			note(err)
		} else if err := os.Remove(stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			note(err)
		}
	}
	c.logf("cluster: torn down in %.1fs", time.Since(t0).Seconds())
	return errors.Join(errs...)
}

// restore unmounts, removes and resets what the cluster changed on the host.
func (h *hostState) restore(ctx context.Context) error {
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	// Mounts: pod volumes and the node plugin's mounts under the kubelet
	// root, container root filesystems under the work directory, network
	// namespaces the CNI made.
	prefixes := []string{h.WorkDir, "/run/netns", "/run/containerd"}
	for _, p := range prefixes {
		note(unmountUnder(p, false))
	}
	note(unmountUnder(h.KubeletRoot, !h.BoundKubeletRoot))
	if h.BoundKubeletRoot {
		note(unmountUnder(h.KubeletRoot, true))
	}
	note(removeCgroups("kubepods"))
	if _, err := os.Stat("/sys/class/net/" + cniBridge); err == nil {
		if _, err := run(ctx, "ip", "link", "delete", cniBridge); err != nil {
			note(err)
		}
	}
	for _, p := range []string{filepath.Join("/var/lib/cni/networks", cniNetwork)} {
		note(removeChecked(p))
	}
	if names, err := readDirNames("/var/lib/cni/results"); err == nil {
		for _, n := range names {
			if strings.HasPrefix(n, cniNetwork+"-") {
				note(removeChecked(filepath.Join("/var/lib/cni/results", n)))
			}
		}
	}
	for cmd, saved := range h.Iptables {
		now, err := run(ctx, cmd)
		if err != nil {
			note(err)
			continue
		}
		if stripComments(now) == stripComments(saved) {
			continue
		}
		restore := strings.Replace(cmd, "-save", "-restore", 1)
		rc := exec.CommandContext(ctx, restore)
		rc.Stdin = strings.NewReader(saved)
		if out, err := rc.CombinedOutput(); err != nil {
			note(fmt.Errorf("%s: %w: %s", restore, err, out))
		}
	}
	for s, v := range h.Sysctls {
		if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0o644); err != nil {
			note(fmt.Errorf("restore sysctl %s=%s: %w", s, v, err))
		}
	}
	for _, d := range append(hostDirs, h.KubeletRoot) {
		if !h.Existed[d] {
			note(removeChecked(d))
			continue
		}
		names, err := readDirNames(d)
		if err != nil {
			continue
		}
		for _, n := range names {
			if !h.Entries[d][n] {
				note(removeChecked(filepath.Join(d, n)))
			}
		}
	}
	return errors.Join(errs...)
}

func stripComments(rules string) string {
	var b strings.Builder
	for _, l := range strings.Split(rules, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		// Packet counters change all the time; compare the rules only.
		if strings.HasPrefix(l, ":") {
			if i := strings.LastIndex(l, " ["); i > 0 {
				l = l[:i]
			}
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mounts = append(mounts, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	sort.SliceStable(mounts, func(i, j int) bool { return strings.Count(mounts[i], "/") > strings.Count(mounts[j], "/") })
	return mounts, nil
}

// unescapeMount undoes the octal escapes (\040 for a space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts every mount below dir (and dir itself when self is
// true), deepest first, detaching lazily what is still busy.
func unmountUnder(dir string, self bool) error {
	var errs []error
	for attempt := 0; attempt < 5; attempt++ {
		mounts, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		left := 0
		errs = nil
		for _, m := range mounts {
			if m == dir && !self {
				continue
			}
			left++
			if err := unix.Unmount(m, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				if err2 := unix.Unmount(m, unix.MNT_DETACH); err2 != nil && !errors.Is(err2, unix.EINVAL) {
					errs = append(errs, fmt.Errorf("unmount %s: %w", m, err2))
				}
			}
		}
		if left == 0 {
			return nil
		}
	}
	return errors.Join(errs...)
}

// removeChecked removes path recursively, but never while a mount remains
// below it: RemoveAll would then delete the mounted volume's data.
func removeChecked(path string) error {
	mounts, err := mountsUnder(path)
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("not removing %s: still mounted below it: %s", path, strings.Join(mounts, ", "))
	}
	if err := os.RemoveAll(path); err != nil {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// cgroupDirs lists the directories named name at the top of each cgroup
// hierarchy, with everything below them, deepest first.
func cgroupDirs(name string) []string {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/" + name)
	if d := "/sys/fs/cgroup/" + name; isDir(d) {
		roots = append(roots, d)
	}
	var dirs []string
	for _, r := range roots {
		_ = filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	sort.SliceStable(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	return dirs
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// killCgroupProcs kills every process left in the pod cgroups.
func killCgroupProcs(name string) error {
	for attempt := 0; attempt < 20; attempt++ {
		found := false
		for _, d := range cgroupDirs(name) {
			b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					found = true
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		if !found {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("processes survive in the %s cgroups", name)
}

func removeCgroups(name string) error {
	var errs []error
	for _, d := range cgroupDirs(name) {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// killShims kills the containerd shims that serve the containerd at socket:
// they outlive containerd by design.
func killShims(socket string) error {
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.Contains(args[0], "containerd-shim") {
			continue
		}
		for _, a := range args {
			if a == socket {
				if pid, err := strconv.Atoi(strings.Split(p, "/")[2]); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
	return nil
}
