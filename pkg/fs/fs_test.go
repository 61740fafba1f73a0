package fs

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestValidateMountOptions(t *testing.T) {
	if err := ValidateMountOptions([]string{"noatime", "discard", "data=ordered", "commit=30"}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "ro,bind", "bind", "rbind", "remount", "move", "make-shared", "x-systemd.requires=a", "X-mount.mkdir", "a b", "a\x00", `a"b`, "loop"} {
		if err := ValidateMountOptions([]string{bad}); err == nil {
			t.Errorf("ValidateMountOptions(%q) succeeded", bad)
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
	for _, s := range []string{"noatime", "ro,bind", "data=journal", "x-mount.mkdir", "remount", "a b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, opt string) {
		if ValidateMountOptions([]string{opt}) != nil {
			return
		}
		if strings.ContainsAny(opt, ", \t\n\x00\"'\\") || opt == "" {
			t.Fatalf("accepted option %q that could smuggle more options", opt)
		}
		name, _, _ := strings.Cut(opt, "=")
		if forbiddenOptions[name] {
			t.Fatalf("accepted forbidden option %q", opt)
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
