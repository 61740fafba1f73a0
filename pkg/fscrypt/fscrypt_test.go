package fscrypt

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestDeriveKey(t *testing.T) {
	master := bytes.Repeat([]byte("m"), MinMasterKeyBytes)
	s1, err := NewSalt()
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := NewSalt()
	if !ValidSalt(s1) || ValidSalt("zz") || ValidSalt(s1[:10]) {
		t.Fatal("ValidSalt")
	}
	k1, err := DeriveKey(master, s1)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := DeriveKey(master, s1)
	k2, _ := DeriveKey(master, s2)
	if len(k1) != keyBytes || !bytes.Equal(k1, again) || bytes.Equal(k1, k2) {
		t.Fatalf("derived keys: same salt must give the same key, another salt another key")
	}
	if bytes.Contains(k1, master[:8]) {
		t.Fatal("the derived key contains the master key")
	}
	if _, err := DeriveKey(master[:31], s1); !errors.Is(err, ErrShortKey) {
		t.Fatalf("31-byte master key: %v", err)
	}
	if _, err := DeriveKey(master, "nothex"); err == nil {
		t.Fatal("malformed salt accepted")
	}
	k1.Wipe()
	if !bytes.Equal(k1, make([]byte, keyBytes)) {
		t.Fatal("Wipe left key material")
	}
}

// mountExt4 makes an ext4 filesystem (with the encrypt feature unless
// plain) on a sparse file and mounts it through a loop device that goes
// away with the mount.
func mountExt4(t *testing.T, encrypt bool) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and mounts")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 is not installed")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "image")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Truncate(64 << 20)
	_ = f.Close()
	args := []string{"-q", "-F", img}
	if encrypt {
		args = append([]string{"-O", "encrypt"}, args...)
	}
	if out, err := exec.Command("mkfs.ext4", args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	})
	return mnt
}

func key(t *testing.T, master string) Key {
	t.Helper()
	k, err := DeriveKey([]byte(master), strings.Repeat("ab", SaltBytes))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Unlock encrypts a new directory; Lock removes the key and the kernel no
// longer shows names or contents; the right key unlocks again, a wrong key
// is refused and does not stay in the keyring.
func TestUnlockLock(t *testing.T) {
	mnt := mountExt4(t, true)
	right := key(t, strings.Repeat("r", 32))
	id, err := Unlock(mnt, "data", right, true)
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("PLAINTEXT-MARKER-4e1b")
	if err := os.WriteFile(filepath.Join(mnt, "data", "marker-name"), secret, 0o644); err != nil {
		t.Fatal(err)
	}
	if again, err := Unlock(mnt, "data", right, true); err != nil || again != id {
		t.Fatalf("unlocking an unlocked directory again: %v, %v", again, err)
	}
	if present, err := keyStatus(mnt, id); err != nil || !present {
		t.Fatalf("key status after unlock: %v, %v", present, err)
	}
	// Files are closed and synced: the kernel can evict them.
	unix.Sync()
	got, busy, err := Lock(mnt, "data")
	if err != nil || busy || got != id {
		t.Fatalf("Lock: %v, busy %v, %v", got, busy, err)
	}
	if present, err := keyStatus(mnt, id); err != nil || present {
		t.Fatalf("key status after lock: %v, %v", present, err)
	}
	names, err := os.ReadDir(filepath.Join(mnt, "data"))
	if err != nil || len(names) != 1 || names[0].Name() == "marker-name" {
		t.Fatalf("a locked directory lists %v (%v): want one encrypted name", names, err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "data", names[0].Name())); err == nil || bytes.Contains(b, secret) {
		t.Fatalf("read a locked file: %q, %v", b, err)
	}

	wrong := key(t, strings.Repeat("w", 32))
	if _, err := Unlock(mnt, "data", wrong, true); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("wrong key: %v", err)
	} else if strings.Contains(err.Error(), string(wrong)) {
		t.Fatal("the error holds key material")
	}
	wrongID, err := addKey(mustOpen(t, mnt), wrong)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = removeKey(mustOpen(t, mnt), wrongID)
	if _, err := Unlock(mnt, "data", right, false); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "data", "marker-name")); err != nil || !bytes.Equal(b, secret) {
		t.Fatalf("after unlocking again: %q, %v", b, err)
	}
	if _, _, err := Lock(mnt, "data"); err != nil {
		t.Fatal(err)
	}
	if present, _ := keyStatus(mnt, wrongID); present {
		t.Fatal("a wrong key stayed in the keyring")
	}
}

func mustOpen(t *testing.T, p string) int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// What Unlock refuses: a directory with unencrypted files, a link in its
// place, a filesystem without the encrypt feature, a missing directory on
// a read-only unlock.
func TestUnlockRefuses(t *testing.T) {
	mnt := mountExt4(t, true)
	k := key(t, strings.Repeat("k", 40))
	if err := os.MkdirAll(filepath.Join(mnt, "plain"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "plain", "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Unlock(mnt, "plain", k, true); !errors.Is(err, ErrNotEncrypted) {
		t.Fatalf("directory with unencrypted files: %v", err)
	}
	if err := os.Symlink("plain", filepath.Join(mnt, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := Unlock(mnt, "link", k, true); !errors.Is(err, ErrNotEncrypted) {
		t.Fatalf("symlink: %v", err)
	}
	if _, err := Unlock(mnt, "missing", k, false); !errors.Is(err, ErrNotEncrypted) {
		t.Fatalf("missing directory without create: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(mnt, "missing")); !os.IsNotExist(err) {
		t.Fatal("a read-only unlock created the directory")
	}
	if id, _, err := Lock(mnt, "plain"); err != nil || id != (Identifier{}) {
		t.Fatalf("locking an unencrypted directory: %v, %v", id, err)
	}

	plain := mountExt4(t, false)
	if _, err := Unlock(plain, "data", k, true); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("ext4 without the encrypt feature: %v", err)
	}
}

// keyStatus reports whether the key id is in the keyring of the filesystem
// mounted at root.
func keyStatus(root string, id Identifier) (present bool, err error) {
	f, err := os.Open(root)
	if err != nil {
		return false, err
	}
	defer f.Close()
	var arg unix.FscryptGetKeyStatusArg
	arg.Key_spec.Type = unix.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
	copy(arg.Key_spec.U[:], id[:])
	if err := ioctl(int(f.Fd()), unix.FS_IOC_GET_ENCRYPTION_KEY_STATUS, unsafe.Pointer(&arg)); err != nil {
		return false, fmt.Errorf("FS_IOC_GET_ENCRYPTION_KEY_STATUS: %w", unsupported(err))
	}
	return arg.Status == unix.FSCRYPT_KEY_STATUS_PRESENT, nil
}
