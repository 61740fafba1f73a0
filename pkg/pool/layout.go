package pool

import (
	"path/filepath"

	"github.com/spool-csi/spool/pkg/volid"
)

// The layout of a pool directory, for code that looks at a pool from the
// outside: the e2e harness, the bench and the tests that plant files in a
// pool. Everything that serves a pool goes through Pool, which resolves
// these paths beneath a descriptor of the root.
const (
	// ImageName is the file name of a volume's or snapshot's image.
	ImageName = imageFile
	// MetadataName is the file name of a volume's metadata.
	MetadataName = metaFile
	// SnapshotMetadataName is the file name of a snapshot's metadata.
	SnapshotMetadataName = snapshotMeta
)

// VolumesDir is the directory of a pool's volumes.
func VolumesDir(root string) string { return filepath.Join(root, volumesDir) }

// SnapshotsDir is the directory of a pool's snapshots.
func SnapshotsDir(root string) string { return filepath.Join(root, snapshotsDir) }

// VolumeDir is the directory of the volume with this ID (or token) in the
// pool at root; "" for an ID that names no volume.
func VolumeDir(root, id string) string {
	tok := tokenOf(id, volid.KindVolume)
	if tok == "" {
		return ""
	}
	return filepath.Join(root, volumesDir, tok)
}

// SnapshotDir is the directory of the snapshot with this ID (or token) in
// the pool at root; "" for an ID that names no snapshot.
func SnapshotDir(root, id string) string {
	tok := tokenOf(id, volid.KindSnapshot)
	if tok == "" {
		return ""
	}
	return filepath.Join(root, snapshotsDir, tok)
}

// tokenOf returns the token of an ID of a kind, or the token itself.
func tokenOf(id string, kind volid.Kind) string {
	if volid.IsToken(id) {
		return id
	}
	v, err := volid.ParseKind(id, kind)
	if err != nil {
		return ""
	}
	return v.Token
}
