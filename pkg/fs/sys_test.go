package fs

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestSplitOptions(t *testing.T) {
	flags, data := splitOptions([]string{"nosuid", "nodev", "ro", "noatime", "errors=remount-ro", "context=\"system_u:object_r:t:s0:c1,c2\"", "nouuid", "rw", "exec"})
	if want := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_RDONLY | unix.MS_NOATIME); flags != want {
		t.Errorf("flags %#x, want %#x", flags, want)
	}
	if want := "errors=remount-ro,context=\"system_u:object_r:t:s0:c1,c2\",nouuid"; data != want {
		t.Errorf("data %q, want %q", data, want)
	}
}

// probeMagic names the filesystems mkfs makes, and leaves everything else
// (blank, or more than one magic) to blkid.
func TestProbeMagic(t *testing.T) {
	dir := t.TempDir()
	image := func(name string, n int64) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(n); err != nil {
			t.Fatal(err)
		}
		_ = f.Close()
		return p
	}
	blank := image("blank", 1<<20)
	if got, isBlank, err := probeMagic(blank); err != nil || got != "" || !isBlank {
		t.Errorf("blank: %q, blank %t, %v", got, isBlank, err)
	}
	// Zeros at the start, a signature at the end (an MD RAID 1.0
	// superblock, a GPT backup): not blank, blkid decides.
	tail := image("tail", 1<<20)
	if f, err := os.OpenFile(tail, os.O_WRONLY, 0); err == nil {
		_, _ = f.WriteAt([]byte{0xfc, 0x4e, 0x2b, 0xa9}, 1<<20-8192)
		_ = f.Close()
	}
	if got, isBlank, err := probeMagic(tail); err != nil || got != "" || isBlank {
		t.Errorf("signature at the end: %q, blank %t, %v", got, isBlank, err)
	}
	for fsType, n := range map[string]int64{"ext4": 64 << 20, "xfs": 300 << 20, "btrfs": 128 << 20} {
		if _, err := exec.LookPath("mkfs." + fsType); err != nil {
			t.Logf("mkfs.%s missing: not probed", fsType)
			continue
		}
		p := image(fsType, n)
		if out, err := exec.Command("mkfs."+fsType, append(mkfsArgs(fsType, p, nil), "-q")...).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.%s: %v: %s", fsType, err, out)
		}
		if got, _, err := probeMagic(p); err != nil || got != fsType {
			t.Errorf("%s: probed %q, %v", fsType, got, err)
		}
	}
	// Two magics at once: not ours to decide.
	both := image("both", 1<<20)
	f, err := os.OpenFile(both, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteAt([]byte("XFSB"), 0)
	_, _ = f.WriteAt([]byte{0x53, 0xEF}, ext4SuperOffset+0x38)
	_, _ = f.WriteAt([]byte{ext4Extents, 0, 0, 0}, ext4IncompatOff)
	_ = f.Close()
	if got, isBlank, err := probeMagic(both); err != nil || got != "" || isBlank {
		t.Errorf("two magics: %q, blank %t, %v", got, isBlank, err)
	}
}
