package doctor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/pool"
)

// fakeHost is a node described by files and functions; good() is one
// that has everything.
type fakeHost struct {
	dir                                   string
	filesystems, mountinfo, status, locks string
	missing                               map[string]bool
	loopErr                               error
	loops                                 []string
}

func good(t *testing.T) *fakeHost {
	return &fakeHost{
		dir:         t.TempDir(),
		filesystems: "nodev\tproc\n\text4\n\txfs\n\tbtrfs\n",
		mountinfo: "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n" +
			"40 27 254:0 /var/lib/kubelet /var/lib/kubelet rw,relatime shared:5 - ext4 /dev/vda rw\n",
		status:  "Name:\tspool\nCapEff:\t000001ffffffffff\n",
		missing: map[string]bool{},
	}
}

func (h *fakeHost) system(t *testing.T) System {
	write := func(name, data string) string {
		p := filepath.Join(h.dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return System{
		ProcFilesystems: write("filesystems", h.filesystems),
		MountInfo:       write("mountinfo", h.mountinfo),
		Status:          write("status", h.status),
		Locks:           write("locks", h.locks),
		LoopControl: func() (string, error) {
			if h.loopErr != nil {
				return "", h.loopErr
			}
			return "/dev/loop3", nil
		},
		LookPath: func(name string) (string, error) {
			if h.missing[name] {
				return "", errors.New("not found")
			}
			return "/usr/sbin/" + name, nil
		},
		Version: func(_ context.Context, path string, _ ...string) string { return filepath.Base(path) + " 1.0" },
		Loops:   func() ([]string, error) { return h.loops, nil },
	}
}

// newPool makes a local pool the way the driver does at its first start.
func newPool(t *testing.T, name string) pool.Spec {
	spec := pool.Spec{Name: name, Dir: filepath.Join(t.TempDir(), name)}
	p, err := pool.Open(spec, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	return spec
}

func verdicts(rs []Result) map[string]Result {
	m := map[string]Result{}
	for _, r := range rs {
		m[r.Check] = r
	}
	return m
}

func want(t *testing.T, got map[string]Result, check string, v Verdict, detail string) {
	t.Helper()
	r, ok := got[check]
	if !ok {
		t.Errorf("no check %q", check)
		return
	}
	if r.Verdict != v || !strings.Contains(r.Detail, detail) {
		t.Errorf("%s: %s %q, want %s and %q", check, r.Verdict, r.Detail, v, detail)
	}
	if r.Verdict != OK && r.Fix == "" && v == Fail {
		t.Errorf("%s fails without a fix", check)
	}
}

func TestGoodNode(t *testing.T) {
	h := good(t)
	spec := newPool(t, "default")
	rs := Run(context.Background(), h.system(t), Config{Pools: pool.Specs{spec}, KubeletDir: "/var/lib/kubelet"})
	if Failed(rs) {
		t.Fatalf("a good node fails: %+v", rs)
	}
	got := verdicts(rs)
	want(t, got, "loop devices", OK, "/dev/loop3")
	want(t, got, "filesystem ext4", OK, "mkfs.ext4 1.0")
	want(t, got, "filesystem btrfs", OK, "kernel: yes")
	want(t, got, "pool default: lock", OK, "free")
	want(t, got, "pool default: space", OK, "provisioned 0,")
	want(t, got, "pool default: leftovers", OK, "none")
	want(t, got, "pool default: direct I/O", OK, "yes")
	want(t, got, "mount propagation of /var/lib/kubelet", OK, "shared:5")
	want(t, got, "CAP_SYS_RESOURCE", OK, "held")
	want(t, got, "loop devices of pool images", OK, "0 attached")
	// The scratch files of the reflink and direct I/O tries are gone.
	if entries, _ := os.ReadDir(filepath.Join(spec.Dir, ".tmp")); len(entries) != 0 {
		t.Errorf("doctor left %v in the pool's .tmp", entries)
	}
}

func TestBrokenNode(t *testing.T) {
	h := good(t)
	h.missing["mkfs.ext4"], h.missing["mkfs.btrfs"] = true, true
	h.filesystems = "nodev\tproc\n\text4\n"
	h.mountinfo = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
	h.status = "CapEff:\t0000000000000000\n"
	h.loopErr = errors.New("open /dev/loop-control: no such file or directory")
	served := newPool(t, "served")
	idle := newPool(t, "idle")
	// A driver holds served's lock (as /proc/locks shows it); idle has
	// leftovers of an interrupted operation and a loop device on a
	// deleted image.
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(served.Dir, ".lock"), &st); err != nil {
		t.Fatal(err)
	}
	h.locks = fmt.Sprintf("1: FLOCK  ADVISORY  WRITE 42 %02x:%02x:%d 0 EOF\n", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	if err := os.Mkdir(filepath.Join(idle.Dir, ".tmp", "vol-interrupted"), 0o700); err != nil {
		t.Fatal(err)
	}
	h.loops = []string{filepath.Join(idle.Dir, "volumes", "x", "disk.img") + " (deleted)", "/elsewhere/disk.img (deleted)"}
	missing := pool.Spec{Name: "missing", Dir: filepath.Join(t.TempDir(), "nothing")}
	share := pool.Spec{Name: "share", Dir: t.TempDir(), Shared: true}

	var out, errb strings.Builder
	code := doctorRun(t, h.system(t), Config{Pools: pool.Specs{served, idle, missing, share}, KubeletDir: "/var/lib/kubelet"}, &out, &errb)
	if code != 1 {
		t.Fatalf("exit %d on a broken node, want 1\n%s", code, out.String())
	}
	got := verdicts(Run(context.Background(), h.system(t), Config{Pools: pool.Specs{served, idle, missing, share}, KubeletDir: "/var/lib/kubelet"}))
	want(t, got, "loop devices", Fail, "no free loop device")
	want(t, got, "filesystem ext4", Fail, "missing mkfs.ext4")
	want(t, got, "filesystem btrfs", Warn, "missing mkfs.btrfs")
	want(t, got, "filesystem xfs", Warn, "not in /proc/filesystems")
	want(t, got, "pool served: lock", OK, "held")
	want(t, got, "pool served: space", OK, "spool_pool_provisioned_bytes")
	want(t, got, "pool idle: lock", OK, "free")
	want(t, got, "pool idle: leftovers", Warn, "1 in .tmp")
	want(t, got, "pool missing", Fail, "no such file")
	want(t, got, "pool share", Fail, "holds no pool")
	// An initialised shared pool is read without its lock, and what its
	// .tmp holds may be another node's controller at work.
	initShare := pool.Spec{Name: "nfs", Dir: filepath.Join(t.TempDir(), "nfs"), Shared: true}
	if _, err := pool.Init(initShare.Name, initShare.Dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(initShare.Dir, ".tmp", "in-flight"), 0o700); err != nil {
		t.Fatal(err)
	}
	shared := verdicts(Run(context.Background(), h.system(t), Config{Pools: pool.Specs{initShare}, KubeletDir: "/var/lib/kubelet"}))
	want(t, shared, "pool nfs: lock", OK, "shared pool")
	want(t, shared, "pool nfs: space", OK, "provisioned 0,")
	want(t, shared, "pool nfs: leftovers", OK, "1 in .tmp")
	want(t, got, "mount propagation of /var/lib/kubelet", Fail, "private")
	want(t, got, "CAP_SYS_RESOURCE", Warn, "missing")
	want(t, got, "loop devices of pool images", Warn, "1 backed by a deleted image")
	if !strings.Contains(out.String(), "FAIL  filesystem ext4") || !strings.Contains(out.String(), "fix: apt-get install e2fsprogs") {
		t.Errorf("text output:\n%s", out.String())
	}
}

// doctorRun is the command's output path, with JSON.
func doctorRun(t *testing.T, sys System, cfg Config, out, errb *strings.Builder) int {
	t.Helper()
	rs := Run(context.Background(), sys, cfg)
	Print(out, rs)
	if Failed(rs) {
		return 1
	}
	return 0
}
