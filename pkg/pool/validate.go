package pool

import (
	"errors"
	"fmt"
	"slices"
	"unicode/utf8"

	"github.com/spool-csi/spool/pkg/volid"
)

// Bounds of what metadata may hold. Spool writes far less; anything beyond
// was not written by Spool.
const (
	// MaxImageBytes is the largest volume or snapshot: 64 PiB, far beyond
	// any pool, far below where byte arithmetic could overflow.
	MaxImageBytes = 1 << 56
	// maxNameBytes bounds stored names (the CSI names the CO chooses).
	maxNameBytes = 1024
	// maxAttachments bounds a volume's attachments (one per node).
	maxAttachments = 4096
)

// knownFSTypes are the filesystems a volume record may name ("" for block
// volumes and records made before the filesystem was recorded).
var knownFSTypes = map[string]bool{"": true, "ext4": true, "xfs": true, "btrfs": true}

// validate checks what a volume's metadata says before the pool believes it:
// sizes count against capacity, the access type and filesystem decide what
// the host's kernel is asked to parse, attachments decide who may stage.
func (v *Volume) validate() error {
	var errs []error
	if v.CapacityBytes <= 0 || v.CapacityBytes > MaxImageBytes {
		errs = append(errs, fmt.Errorf("capacityBytes %d out of range", v.CapacityBytes))
	}
	if v.Provisioning != Thin && v.Provisioning != Thick {
		errs = append(errs, fmt.Errorf("unknown provisioning %q", v.Provisioning))
	}
	switch v.AccessType {
	case "", Mount:
	case Block:
		if v.FSType != "" {
			errs = append(errs, fmt.Errorf("block volume with fsType %q", v.FSType))
		}
	default:
		errs = append(errs, fmt.Errorf("unknown access type %q", v.AccessType))
	}
	if !knownFSTypes[v.FSType] {
		errs = append(errs, fmt.Errorf("unknown fsType %q", v.FSType))
	}
	if err := v.Encryption.validate(); err != nil {
		errs = append(errs, err)
	} else if v.Encryption != nil && (v.AccessType == Block || (v.FSType != "" && v.FSType != "ext4")) {
		errs = append(errs, fmt.Errorf("encryption on a %s volume of fsType %q: only ext4 filesystem volumes are encrypted", v.AccessType, v.FSType))
	}
	if err := checkStoredName(v.Name); err != nil {
		errs = append(errs, err)
	}
	if len(v.Attachments) > maxAttachments {
		errs = append(errs, fmt.Errorf("%d attachments", len(v.Attachments)))
	}
	for _, a := range v.Attachments {
		if err := volid.ValidateNodeID(a.Node); err != nil {
			errs = append(errs, fmt.Errorf("attachment: %w", err))
		}
	}
	if v.Source != nil && v.Source.Kind != SourceSnapshot && v.Source.Kind != SourceVolume {
		errs = append(errs, fmt.Errorf("unknown source kind %q", v.Source.Kind))
	}
	return errors.Join(errs...)
}

// validate checks a snapshot's metadata (see Volume.validate).
func (s *Snapshot) validate() error {
	var errs []error
	if s.SizeBytes <= 0 || s.SizeBytes > MaxImageBytes {
		errs = append(errs, fmt.Errorf("sizeBytes %d out of range", s.SizeBytes))
	}
	if _, err := volid.ParseKind(s.SourceVolumeID, volid.KindVolume); err != nil {
		errs = append(errs, fmt.Errorf("source volume ID %q: %w", s.SourceVolumeID, err))
	}
	switch s.AccessType {
	case "", Mount, Block:
	default:
		errs = append(errs, fmt.Errorf("unknown access type %q", s.AccessType))
	}
	if !knownFSTypes[s.FSType] {
		errs = append(errs, fmt.Errorf("unknown fsType %q", s.FSType))
	}
	if err := s.Encryption.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := checkStoredName(s.Name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func checkStoredName(name string) error {
	if name == "" || len(name) > maxNameBytes || !utf8.ValidString(name) {
		return fmt.Errorf("name of %d bytes is not a valid name", len(name))
	}
	return nil
}

// markInvalid records whether the object at rel failed to load.
func (p *Pool) markInvalid(rel string, bad bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !bad {
		delete(p.invalid, rel)
		return
	}
	if p.invalid == nil {
		p.invalid = map[string]bool{}
	}
	p.invalid[rel] = true
}

func (p *Pool) isInvalid(rel string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.invalid[rel]
}

// Invalid lists the objects of the pool (as volumes/<token>,
// snapshots/<token>, groups/<token>) that were skipped because their
// metadata is not what Spool writes. They are left untouched and count
// neither as volumes nor as free space; an administrator must look at them.
func (p *Pool) Invalid() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.invalid))
	for rel := range p.invalid {
		out = append(out, rel)
	}
	slices.Sort(out)
	return out
}
