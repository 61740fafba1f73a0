package fs

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestValidateMountOptions(t *testing.T) {
	for _, tc := range []struct {
		fsType string
		opts   []string
	}{
		{"ext4", []string{"noatime", "nodiratime", "ro", "discard", "data=ordered", "commit=30", "barrier", "barrier=0", "errors=remount-ro", "nosuid", "nodev"}},
		{"xfs", []string{"noatime", "logbsize=256k", "allocsize=64m", "inode64", "norecovery", "nouuid"}},
		{"btrfs", []string{"compress", "compress=zstd:3", "discard=async", "space_cache=v2", "nodatacow", "rescue=nologreplay"}},
		// The request does not say: any supported filesystem's option.
		{"", []string{"noatime", "data=journal", "logbsize=32k", "compress=lzo"}},
		// The kubelet's SELinux mount option, quoted when it holds a comma.
		{"ext4", []string{`context="system_u:object_r:container_file_t:s0:c98,c99"`, "context=system_u:object_r:container_file_t:s0"}},
	} {
		if err := ValidateMountOptions(tc.fsType, tc.opts); err != nil {
			t.Errorf("ValidateMountOptions(%q, %q): %v", tc.fsType, tc.opts, err)
		}
	}
	for _, tc := range []struct{ fsType, opt string }{
		// Malformed: smuggling more options into mount -o.
		{"", ""}, {"ext4", "ro,bind"}, {"ext4", "a b"}, {"ext4", "a\x00"}, {"ext4", `a"b`}, {"ext4", "noatime\n"},
		// Another operation than mounting this filesystem.
		{"ext4", "bind"}, {"ext4", "rbind"}, {"ext4", "remount"}, {"ext4", "move"}, {"ext4", "make-shared"},
		{"ext4", "x-systemd.requires=a"}, {"ext4", "X-mount.mkdir"}, {"ext4", "loop"}, {"", "loop=/dev/loop9"},
		// Naming a path or a device, or a helper for mount(8) to run.
		{"xfs", "logdev=/dev/sda"}, {"xfs", "rtdev=/dev/sda"}, {"ext4", "journal_path=/dev/sda"},
		{"ext4", "journal_dev=2049"}, {"btrfs", "device=/dev/sda"}, {"", "offset=4096"}, {"", "sizelimit=1"},
		{"", "uhelper=udisks2"}, {"", "helper=x"}, {"ext4", "usrjquota=aquota.user"},
		// Taking the node down, or host devices and setuid programs.
		{"ext4", "errors=panic"}, {"btrfs", "fatal_errors=panic"}, {"ext4", "suid"}, {"ext4", "dev"}, {"ext4", "defaults"},
		// SELinux options other than the kubelet's context=, and bad contexts.
		{"ext4", "fscontext=system_u:object_r:container_file_t:s0"}, {"ext4", "defcontext=system_u:object_r:container_file_t:s0"},
		{"ext4", "rootcontext=system_u:object_r:container_file_t:s0"}, {"ext4", "context=system_u:object_r:x:s0:c1,c2"},
		{"ext4", `context="system_u:object_r:x:s0`}, {"ext4", `context="a:b"`}, {"ext4", "context="},
		// Another filesystem's option, bad values.
		{"ext4", "logbsize=32k"}, {"xfs", "data=ordered"}, {"ext4", "commit=x"}, {"ext4", "data=bogus"},
		{"xfs", "logbsize=1t"}, {"ext4", "noatime=1"}, {"btrfs", "compress=zstd:99"},
	} {
		err := ValidateMountOptions(tc.fsType, []string{tc.opt})
		if err == nil {
			t.Errorf("ValidateMountOptions(%q, %q) succeeded", tc.fsType, tc.opt)
		} else if tc.opt != "" && !strings.Contains(err.Error(), strconv.Quote(tc.opt)) {
			t.Errorf("ValidateMountOptions(%q, %q): the error does not name the option: %v", tc.fsType, tc.opt, err)
		}
	}
}

func TestMinSize(t *testing.T) {
	if MinSize("xfs") != 300<<20 || MinSize("btrfs") != 256<<20 || MinSize("ext4") != 1<<20 || MinSize("") != 0 {
		t.Fatal("unexpected minimum sizes")
	}
	if Supported("ntfs") || !Supported("ext4") {
		t.Fatal("Supported")
	}
}

// The mount table escapes spaces and other characters; Mounts must return
// the real path so that MountAt matches what a CO passes.
func TestMountsUnescapesPaths(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	dir := filepath.Join(t.TempDir(), "with space\tand tab")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, 0) })
	mounts, err := Mounts()
	if err != nil {
		t.Fatal(err)
	}
	m, ok := MountAt(mounts, dir)
	if !ok || m.FsType != "tmpfs" || m.Root != "/" {
		t.Fatalf("MountAt(%q) = %+v, %t", dir, m, ok)
	}
}

func TestMakeDirAndFileRefuseSymlinks(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.Mkdir(victim, 0o750); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	if err := MakeDir(link); err == nil {
		t.Error("MakeDir accepted a symlink to a directory")
	}
	fileLink := filepath.Join(dir, "filelink")
	if err := os.Symlink(filepath.Join(victim, "f"), fileLink); err != nil {
		t.Fatal(err)
	}
	if err := MakeFile(fileLink); err == nil {
		t.Error("MakeFile followed a symlink")
	}
	if _, err := os.Stat(filepath.Join(victim, "f")); !os.IsNotExist(err) {
		t.Error("MakeFile created a file through a symlink")
	}
	if err := MakeDir(filepath.Join(dir, "new")); err != nil {
		t.Fatal(err)
	}
	if err := MakeDir(filepath.Join(dir, "new")); err != nil {
		t.Fatalf("MakeDir is not idempotent: %v", err)
	}
}

func FuzzValidateMountOptions(f *testing.F) {
	for _, s := range []string{"noatime", "ro,bind", "data=journal", "x-mount.mkdir", "remount", "a b",
		"logbsize=32k", `context="system_u:object_r:t:s0:c1,c2"`, "compress=zstd:3", "errors=panic"} {
		f.Add("ext4", s)
		f.Add("", s)
	}
	f.Fuzz(func(t *testing.T, fsType, opt string) {
		if ValidateMountOptions(fsType, []string{opt}) != nil {
			return
		}
		name, value, _ := strings.Cut(opt, "=")
		if name == "context" {
			if strings.ContainsAny(strings.Trim(value, `"`), ` '"\/=`) || strings.Count(value, `"`)%2 != 0 {
				t.Fatalf("accepted context option %q that could smuggle more options", opt)
			}
			return
		}
		if strings.ContainsAny(opt, ", \t\n\x00\"'\\/") || opt == "" {
			t.Fatalf("accepted option %q that could smuggle more options or name a path", opt)
		}
		_, generic := genericOptions[name]
		known := generic
		for _, m := range fsOptions {
			if _, ok := m[name]; ok {
				known = true
			}
		}
		if !known {
			t.Fatalf("accepted option %q that is on no allowlist", opt)
		}
	})
}

// The superblock is read the way dumpe2fs reports it, and a filesystem
// that recorded errors is recognised.
func TestReadExt4Superblock(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "dumpe2fs", "tune2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	img := filepath.Join(t.TempDir(), "ext4.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 96<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-F", "-q", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	sb, err := readExt4Superblock(img)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("dumpe2fs", "-h", img).Output()
	if err != nil {
		t.Fatal(err)
	}
	want, err := toolFields(parseToolFields(string(out), ":"), "dumpe2fs", "Block count", "Block size", "First block", "Blocks per group", "Inode blocks per group")
	if err != nil {
		t.Fatal(err)
	}
	got := []uint64{sb.blocks, sb.blockSize, sb.firstBlock, sb.blocksPerGroup, sb.inodeBlocksPerG}
	if !slices.Equal(got, want) || sb.hasErrors {
		t.Fatalf("superblock %v (errors %t), dumpe2fs says %v", got, sb.hasErrors, want)
	}
	if out, err := exec.Command("tune2fs", "-E", "force_fsck", img).CombinedOutput(); err != nil {
		t.Fatalf("tune2fs: %v %s", err, out)
	}
	if sb, err := readExt4Superblock(img); err != nil || !sb.hasErrors {
		t.Fatalf("a filesystem marked as having errors: %+v %v", sb, err)
	}
	if err := checkExt(img); err != nil {
		t.Fatal(err)
	}
	if sb, err := readExt4Superblock(img); err != nil || sb.hasErrors {
		t.Fatalf("after e2fsck: %+v %v", sb, err)
	}
	if _, err := readExt4Superblock("/dev/null"); err == nil {
		t.Fatal("read a superblock from /dev/null")
	}
}
