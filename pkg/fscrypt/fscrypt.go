// Package fscrypt encrypts a directory of a mounted filesystem with the
// kernel's native filesystem encryption (fscrypt, v2 policies), keyed by a
// key the caller derives from a master key held outside the pool.
//
// Only what fscrypt itself stores reaches the disk: the policy on the
// directory names the key by its identifier (a one-way hash of the key,
// computed by the kernel). The key lives in the filesystem's keyring, in
// the kernel, while the filesystem is unlocked; Lock removes it, and the
// kernel then evicts the plaintext of the directory's files and names from
// its caches.
package fscrypt

import (
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// MinMasterKeyBytes is the least key material a master key must hold:
	// 256 bits.
	MinMasterKeyBytes = 32
	// SaltBytes is the size of a volume's salt.
	SaltBytes = 32
	// keyBytes is the size of the key given to the kernel: AES-256-XTS
	// needs 64 bytes, the most a v2 policy takes.
	keyBytes = unix.FSCRYPT_MAX_KEY_SIZE
	// info binds the derived keys to their use.
	info = "spool fscrypt v2 volume key"
)

// Errors callers map to their own codes.
var (
	// ErrWrongKey: the directory is encrypted with another key.
	ErrWrongKey = errors.New("the key does not unlock this filesystem")
	// ErrNotEncrypted: the directory exists, holds files and has no
	// encryption policy; encrypting it now would leave them in the clear.
	ErrNotEncrypted = errors.New("the directory holds unencrypted files")
	// ErrUnsupported: the filesystem cannot encrypt (ext4 without the
	// encrypt feature, a kernel without fscrypt).
	ErrUnsupported = errors.New("the filesystem does not support encryption")
	// ErrShortKey: the master key holds too little key material.
	ErrShortKey = errors.New("key too short")
)

// Identifier names a key: the kernel's HKDF-SHA512 hash of it, safe to
// show and to store.
type Identifier [unix.FSCRYPT_KEY_IDENTIFIER_SIZE]byte

func (id Identifier) String() string { return hex.EncodeToString(id[:]) }

// NewSalt returns a new random salt, hex-encoded.
func NewSalt() (string, error) {
	b := make([]byte, SaltBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("reading random salt: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// ValidSalt reports whether s is a salt NewSalt could have made.
func ValidSalt(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == SaltBytes
}

// Key is key material handed to the kernel. Wipe it when done.
type Key []byte

// Wipe overwrites the key material.
func (k Key) Wipe() { clear(k) }

// DeriveKey derives a volume's key from the master key and the volume's
// salt (hex), with HKDF-SHA256. Two volumes with different salts get
// unrelated keys; a copy of a volume carries its salt and so its key.
func DeriveKey(master []byte, salt string) (Key, error) {
	if len(master) < MinMasterKeyBytes {
		return nil, fmt.Errorf("%w: %d bytes, at least %d are needed", ErrShortKey, len(master), MinMasterKeyBytes)
	}
	s, err := hex.DecodeString(salt)
	if err != nil || len(s) != SaltBytes {
		return nil, fmt.Errorf("malformed salt")
	}
	k, err := hkdf.Key(sha256.New, master, s, info, keyBytes)
	if err != nil {
		return nil, fmt.Errorf("deriving the volume key: %w", err)
	}
	return Key(k), nil
}

// Unlock adds key to the keyring of the filesystem mounted at root and
// makes sure that the directory named dir in root is encrypted with it.
// A missing directory is created, and an empty one without a policy gets
// one, when create is set (a read-only mount cannot). A directory encrypted
// with another key is ErrWrongKey, and the key just added is removed again.
// It returns the key's identifier.
func Unlock(root, dir string, key Key, create bool) (Identifier, error) {
	rootFd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return Identifier{}, fmt.Errorf("opening %s: %w", root, err)
	}
	defer unix.Close(rootFd)
	id, err := addKey(rootFd, key)
	if err != nil {
		return Identifier{}, err
	}
	if err := ensurePolicy(rootFd, dir, id, create); err != nil {
		if errors.Is(err, ErrWrongKey) || errors.Is(err, ErrNotEncrypted) {
			// The key unlocks nothing here: it does not stay.
			if _, rerr := removeKey(rootFd, id); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return Identifier{}, fmt.Errorf("%s/%s: %w", root, dir, err)
	}
	return id, nil
}

// ensurePolicy checks or sets the policy of the directory dir in rootFd.
func ensurePolicy(rootFd int, dir string, id Identifier, create bool) error {
	fd, err := unix.Openat(rootFd, dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) && create {
		if err := unix.Mkdirat(rootFd, dir, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("creating the encrypted directory: %w", err)
		}
		fd, err = unix.Openat(rootFd, dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("%w: it is not a directory", ErrNotEncrypted)
		}
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: the directory is missing and the filesystem is read-only", ErrNotEncrypted)
		}
		return fmt.Errorf("opening the encrypted directory: %w", err)
	}
	defer unix.Close(fd)
	have, encrypted, err := policyOf(fd)
	if err != nil {
		return err
	}
	if encrypted {
		if have != id {
			return fmt.Errorf("%w: its files are encrypted with key %s, the key given is %s", ErrWrongKey, have, id)
		}
		return nil
	}
	if !create {
		return fmt.Errorf("%w: it has no encryption policy and the filesystem is read-only", ErrNotEncrypted)
	}
	return setPolicy(fd, id)
}

// Lock removes the key that encrypts the directory dir of the filesystem
// mounted at root from its keyring, for all users. The kernel evicts the
// plaintext of files no longer open; busy reports files still open (their
// key stays until they are closed). A directory that is missing or not
// encrypted has nothing to lock.
func Lock(root, dir string) (id Identifier, busy bool, err error) {
	rootFd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return id, false, fmt.Errorf("opening %s: %w", root, err)
	}
	defer unix.Close(rootFd)
	fd, err := unix.Openat(rootFd, dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		return id, false, nil
	}
	if err != nil {
		return id, false, fmt.Errorf("opening %s/%s: %w", root, dir, err)
	}
	id, encrypted, err := policyOf(fd)
	unix.Close(fd)
	if err != nil || !encrypted {
		return id, false, err
	}
	busy, err = removeKey(rootFd, id)
	return id, busy, err
}

// addKey adds key to the filesystem of fd and returns its identifier.
func addKey(fd int, key Key) (Identifier, error) {
	var id Identifier
	if len(key) != keyBytes {
		return id, fmt.Errorf("a volume key has %d bytes, not %d", keyBytes, len(key))
	}
	var arg unix.FscryptAddKeyArg
	n := int(unsafe.Sizeof(arg))
	buf := make([]byte, n+len(key))
	defer clear(buf)
	a := (*unix.FscryptAddKeyArg)(unsafe.Pointer(&buf[0]))
	a.Key_spec.Type = unix.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
	a.Raw_size = uint32(len(key))
	copy(buf[n:], key)
	if err := ioctl(fd, unix.FS_IOC_ADD_ENCRYPTION_KEY, unsafe.Pointer(&buf[0])); err != nil {
		return id, fmt.Errorf("adding the key to the filesystem: %w", unsupported(err))
	}
	copy(id[:], a.Key_spec.U[:len(id)])
	return id, nil
}

// removeKey removes the key id from the filesystem of fd, for all users.
func removeKey(fd int, id Identifier) (busy bool, err error) {
	var arg unix.FscryptRemoveKeyArg
	arg.Key_spec.Type = unix.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
	copy(arg.Key_spec.U[:], id[:])
	err = ioctl(fd, unix.FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS, unsafe.Pointer(&arg))
	if errors.Is(err, unix.ENOKEY) {
		return false, nil // not there: nothing to remove
	}
	if err != nil {
		return false, fmt.Errorf("removing key %s: %w", id, unsupported(err))
	}
	return arg.Removal_status_flags&unix.FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY != 0, nil
}

// policyOf returns the identifier of the key a directory is encrypted
// with; encrypted is false when it has no policy.
func policyOf(fd int) (id Identifier, encrypted bool, err error) {
	var arg unix.FscryptGetPolicyExArg
	arg.Size = uint64(len(arg.Policy))
	err = ioctl(fd, unix.FS_IOC_GET_ENCRYPTION_POLICY_EX, unsafe.Pointer(&arg))
	if errors.Is(err, unix.ENODATA) {
		return id, false, nil
	}
	if err != nil {
		return id, false, fmt.Errorf("reading the encryption policy: %w", unsupported(err))
	}
	if arg.Policy[0] != unix.FSCRYPT_POLICY_V2 {
		return id, true, fmt.Errorf("%w: the directory has a version %d policy, not Spool's version 2", ErrWrongKey, arg.Policy[0])
	}
	p := (*unix.FscryptPolicyV2)(unsafe.Pointer(&arg.Policy[0]))
	return Identifier(p.Master_key_identifier), true, nil
}

// setPolicy encrypts the empty directory fd with the key id: AES-256-XTS
// for contents, AES-256-CTS for names (the kernel's recommended default),
// names padded to 32 bytes so that their lengths say less.
func setPolicy(fd int, id Identifier) error {
	p := unix.FscryptPolicyV2{
		Version:                   unix.FSCRYPT_POLICY_V2,
		Contents_encryption_mode:  unix.FSCRYPT_MODE_AES_256_XTS,
		Filenames_encryption_mode: unix.FSCRYPT_MODE_AES_256_CTS,
		Flags:                     unix.FSCRYPT_POLICY_FLAGS_PAD_32,
		Master_key_identifier:     id,
	}
	err := ioctl(fd, unix.FS_IOC_SET_ENCRYPTION_POLICY, unsafe.Pointer(&p))
	if errors.Is(err, unix.ENOTEMPTY) {
		return fmt.Errorf("%w: it is not empty and has no encryption policy", ErrNotEncrypted)
	}
	if err != nil {
		return fmt.Errorf("setting the encryption policy: %w", unsupported(err))
	}
	return nil
}

// unsupported marks the errors a filesystem without encryption gives.
func unsupported(err error) error {
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) {
		return fmt.Errorf("%w (%w)", ErrUnsupported, err)
	}
	return err
}

func ioctl(fd int, req uint, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
