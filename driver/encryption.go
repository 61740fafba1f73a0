package driver

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/fscrypt"
	"github.com/spool-csi/spool/pkg/pool"
)

// Encryption at rest (StorageClass parameter encryption: fscrypt).
//
// An encrypted volume is an ext4 filesystem made with the encrypt feature.
// NodeStage mounts it at the staging path as any other, derives the
// volume's key from the master key in the node-stage Secret and the salt in
// the volume's metadata, adds it to the filesystem's keyring and makes sure
// that the directory encryptedDir is encrypted with it (the first stage
// creates it with a fscrypt v2 policy). NodePublish binds that directory,
// so a pod sees an empty volume whose files and names are encrypted on
// disk. NodeUnstage removes the key before unmounting: the kernel evicts
// the plaintext from its caches. Neither the master key nor the volume's
// key is stored, logged or put in an error; the policy on the directory
// names the key by its identifier, a one-way hash.

const (
	// SecretEncryptionKey is the field of the node-stage Secret that holds
	// the master key: at least fscrypt.MinMasterKeyBytes bytes.
	SecretEncryptionKey = "encryptionKey"
	// encryptedDir is the directory of an encrypted volume's filesystem
	// that pods see.
	encryptedDir = "data"
)

// checkEncryption refuses encryption where it cannot be given: fscrypt
// encrypts files in an ext4 filesystem, and a copy keeps its origin's
// bytes.
func checkEncryption(prm params, vc volumeCaps, src *contentSrc) error {
	if prm.encryption == "" {
		return nil
	}
	switch {
	case vc.accessType == pool.Block:
		return invalidf("parameter %s=%s: raw block volumes cannot be encrypted: fscrypt encrypts the files of an ext4 filesystem, and device-level encryption (dm-crypt) is not used by Spool; use a filesystem volume of fsType ext4", ParamEncryption, prm.encryption)
	case fsTypeOrDefault(vc.fsType) != "ext4":
		return invalidf("parameter %s=%s: only ext4 volumes can be encrypted (fscrypt is ext4's native encryption; xfs has none and btrfs's is not in the kernel), not %s", ParamEncryption, prm.encryption, vc.fsType)
	case src != nil && src.accessType != "" && !src.encrypted:
		return invalidf("parameter %s=%s: %s %s holds unencrypted data, and a copy keeps its origin's bytes; restore it without encryption, or copy its files into a new encrypted volume", ParamEncryption, prm.encryption, src.kind, src.id)
	}
	return nil
}

// encryptionOf names a volume's encryption for messages and listings.
func encryptionOf(v pool.Volume) string {
	if v.Encryption == nil {
		return "none"
	}
	return v.Encryption.Mode
}

// stageKey checks, before anything is attached or mounted, that the
// node-stage secrets of an encrypted volume hold a usable master key, and
// derives the volume's key from it. The CO passes the Secret's contents,
// not its name: messages name the field and the StorageClass parameters
// that choose the Secret, and never a value.
func stageKey(v pool.Volume, secrets map[string]string) (fscrypt.Key, error) {
	if v.Encryption == nil {
		return nil, nil
	}
	master, ok := secrets[SecretEncryptionKey]
	if !ok {
		fields := make([]string, 0, len(secrets))
		for k := range secrets {
			fields = append(fields, k)
		}
		slices.Sort(fields)
		return nil, invalidf("volume %s is encrypted and NodeStageVolume got no node-stage Secret field %q (fields given: %v): name a Secret holding it with the StorageClass parameters csi.storage.k8s.io/node-stage-secret-name and csi.storage.k8s.io/node-stage-secret-namespace", v.ID, SecretEncryptionKey, fields)
	}
	mb := []byte(master)
	defer clear(mb)
	key, err := fscrypt.DeriveKey(mb, v.Encryption.Salt)
	if errors.Is(err, fscrypt.ErrShortKey) {
		return nil, invalidf("volume %s: the node-stage Secret field %q holds %d bytes of key material; at least %d are needed", v.ID, SecretEncryptionKey, len(master), fscrypt.MinMasterKeyBytes)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", v.ID, err)
	}
	return key, nil
}

// unlock adds the volume's key to the filesystem staged at staging and
// checks that it is the key its files are encrypted with. A key that is not
// is PermissionDenied: the Secret is another volume's or was re-created
// with new key material.
func (d *Node) unlock(st *stage) error {
	if st.key == nil {
		return nil
	}
	start := time.Now()
	id, err := d.kernel.Crypt.Unlock(st.staging, encryptedDir, st.key, !st.ro)
	switch {
	case errors.Is(err, fscrypt.ErrWrongKey):
		return status.Errorf(codes.PermissionDenied, "volume %s: the key in the node-stage Secret field %q does not unlock it: %v", st.nv.vol.ID, SecretEncryptionKey, err)
	case errors.Is(err, fscrypt.ErrNotEncrypted), errors.Is(err, fscrypt.ErrUnsupported):
		return preconditionf("volume %s is recorded as encrypted but its filesystem is not as Spool made it: %v", st.nv.vol.ID, err)
	case err != nil:
		return status.Errorf(codes.Internal, "volume %s: unlocking: %v", st.nv.vol.ID, err)
	}
	klog.V(2).InfoS("Unlocked encrypted volume", "volumeID", st.nv.vol.ID, "keyIdentifier", id.String(), "duration", time.Since(start))
	return nil
}

// lock removes the key of an encrypted volume staged at staging from its
// filesystem's keyring; unmounting drops the keyring anyway, so a failure is
// logged and the unstage goes on.
func (d *Node) lock(v pool.Volume, staging string) {
	if v.Encryption == nil {
		return
	}
	id, busy, err := d.kernel.Crypt.Lock(staging, encryptedDir)
	if err != nil {
		klog.ErrorS(err, "Could not remove the key of an encrypted volume before unmounting it; the unmount drops it", "volumeID", v.ID)
		return
	}
	if busy {
		klog.InfoS("Removed the key of an encrypted volume while files of it are still open: their plaintext stays cached until they are closed", "volumeID", v.ID, "keyIdentifier", id.String())
		return
	}
	klog.V(2).InfoS("Removed the key of an encrypted volume", "volumeID", v.ID, "keyIdentifier", id.String())
}

// publishSource is what NodePublish binds for a staged filesystem volume:
// the staging mount, or an encrypted volume's directory in it, which must be
// a directory of that filesystem (the image is not trusted: a link there
// would bind any host path into the pod).
func publishSource(v pool.Volume, staging string) (string, error) {
	if v.Encryption == nil {
		return staging, nil
	}
	dir := filepath.Join(staging, encryptedDir)
	var d, root unix.Stat_t
	if err := unix.Lstat(dir, &d); err != nil {
		return "", preconditionf("volume %s is encrypted but its staged filesystem has no directory %s: NodeStageVolume it again: %v", v.ID, encryptedDir, err)
	}
	if err := unix.Stat(staging, &root); err != nil {
		return "", fmt.Errorf("stat %s: %w", staging, err)
	}
	if d.Mode&unix.S_IFMT != unix.S_IFDIR || d.Dev != root.Dev {
		return "", preconditionf("volume %s: %s in its filesystem is not a directory of it", v.ID, encryptedDir)
	}
	return dir, nil
}
