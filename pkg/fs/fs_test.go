package fs

import (
	"os"
	"path/filepath"
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
