package imagecopy

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// makeNoCOWDir makes dir with the nodatacow flag, which btrfs gives every
// file created in it afterwards.
func makeNoCOWDir(t *testing.T, dir string) {
	t.Helper()
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	flags, err := attrFlags(int(d.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if err := setNoCOW(int(d.Fd()), flags, true); err != nil {
		t.Fatal(err)
	}
}

func isNoCOW(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return IsNoCOW(f)
}

// TestNoCOWOnBtrfs: MarkNoCOW marks a new image on btrfs, and a copy is a
// reflink whichever way the source's and the destination directory's
// flags differ (btrfs refuses to clone between files that differ in it),
// and keeps the source's flag.
func TestNoCOWOnBtrfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and mount")
	}
	if _, err := exec.LookPath("mkfs.btrfs"); err != nil {
		t.Skip("mkfs.btrfs not installed")
	}
	mnt := mountScratch(t, "btrfs", "mkfs.btrfs", "-q")

	img, err := os.OpenFile(filepath.Join(mnt, "new.img"), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	marked, err := MarkNoCOW(img)
	if err != nil || !marked || !IsNoCOW(img) {
		t.Errorf("MarkNoCOW on btrfs: marked %t, %v; nodatacow %t", marked, err, IsNoCOW(img))
	}
	_ = img.Close()

	cow := filepath.Join(mnt, "cow.img")
	writeHalfFull(t, cow, 64*mib, 16*mib)
	nocowDir := filepath.Join(mnt, "nocow")
	makeNoCOWDir(t, nocowDir)
	nocow := filepath.Join(nocowDir, "nocow.img")
	writeHalfFull(t, nocow, 64*mib, 16*mib)
	if isNoCOW(t, cow) || !isNoCOW(t, nocow) {
		t.Fatalf("setup: cow.img nodatacow %t, nocow.img nodatacow %t", isNoCOW(t, cow), isNoCOW(t, nocow))
	}
	for _, tc := range []struct {
		name, src, dst string
		want           bool
	}{
		{"copy-on-write source into a nodatacow directory", cow, filepath.Join(nocowDir, "copy.img"), false},
		{"nodatacow source into a plain directory", nocow, filepath.Join(mnt, "copy.img"), true},
	} {
		m, err := Copy(context.Background(), tc.src, tc.dst)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if m != Reflink {
			t.Errorf("%s: method %q, want %q", tc.name, m, Reflink)
		}
		if got := isNoCOW(t, tc.dst); got != tc.want {
			t.Errorf("%s: copy nodatacow %t, want the source's %t", tc.name, got, tc.want)
		}
		if fileSHA256(t, tc.src) != fileSHA256(t, tc.dst) {
			t.Errorf("%s: the copy differs", tc.name)
		}
	}
}

// TestNoCOWElsewhere: MarkNoCOW leaves a file on another filesystem alone.
func TestNoCOWElsewhere(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.BTRFS_SUPER_MAGIC {
		t.Skip("the temp dir is on btrfs")
	}
	if marked, err := MarkNoCOW(f); err != nil || marked || IsNoCOW(f) {
		t.Errorf("MarkNoCOW off btrfs: marked %t, %v, nodatacow %t", marked, err, IsNoCOW(f))
	}
}
