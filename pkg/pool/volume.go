package pool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/fscrypt"
	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

// Provisioning says whether an image is sparse or preallocated.
type Provisioning string

// Provisioning modes.
const (
	Thin  Provisioning = "thin"
	Thick Provisioning = "thick"
)

// AccessType is how a volume is consumed: through a filesystem or as a raw
// block device.
type AccessType string

// Access types.
const (
	Mount AccessType = "mount"
	Block AccessType = "block"
)

// Attachment records that a volume is attached (ControllerPublished) to a
// node. Generation grows with every new attachment of the volume, so a
// publish context of an older attachment is recognised as stale.
type Attachment struct {
	Node       string `json:"node"`
	ReadOnly   bool   `json:"readOnly"`
	AccessMode string `json:"accessMode"`
	Generation uint64 `json:"generation"`
	// ByNode marks an attachment the node recorded itself at NodeStage:
	// a central attach controller without access to this node-local pool
	// (the local flavour) attached it, and NodeUnstage releases it.
	ByNode bool `json:"byNode,omitempty"`
	// Staged marks, in a shared pool, an attachment its node has staged:
	// a node plugin that restarts and finds a loop device of the volume
	// while its attachment is not marked knows that the device belongs to
	// an older attachment it lost.
	Staged bool `json:"staged,omitempty"`
}

// Volume is a volume's metadata, as stored in volume.json.
type Volume struct {
	ID            string            `json:"id"`
	Name          string            `json:"name"`
	CapacityBytes int64             `json:"capacityBytes"`
	Provisioning  Provisioning      `json:"provisioning"`
	AccessType    AccessType        `json:"accessType"`
	FSType        string            `json:"fsType,omitempty"`
	Parameters    map[string]string `json:"parameters,omitempty"`
	CreatedAt     time.Time         `json:"createdAt"`
	// Generation is the last attachment generation handed out.
	Generation  uint64       `json:"generation"`
	Attachments []Attachment `json:"attachments,omitempty"`
	// Source is the snapshot or volume the volume was copied from.
	Source *Source `json:"source,omitempty"`
	// NewFilesystemID is set on copies: their filesystem still carries the
	// origin's UUID, so the first stage gives it a new one before mounting
	// it next to the origin.
	NewFilesystemID bool `json:"newFilesystemID,omitempty"`
	// Ephemeral marks a CSI ephemeral inline volume: it lives as long as
	// its one pod mount.
	Ephemeral bool `json:"ephemeral,omitempty"`
	// Encryption, when set, says the volume's files are encrypted at rest
	// with a key derived from a Secret the pool never sees.
	Encryption *Encryption `json:"encryption,omitempty"`

	token string
}

// Encryption is how a volume is encrypted. The salt is not secret: with
// the master key (from the node-stage Secret) it derives the volume's key.
// Copies of a volume carry it, so the same Secret unlocks them.
type Encryption struct {
	// Mode is EncryptionFscrypt.
	Mode string `json:"mode"`
	// Salt is 32 random bytes, hex-encoded.
	Salt string `json:"salt"`
}

// EncryptionFscrypt: ext4's native encryption of a directory inside the
// volume's filesystem (pkg/fscrypt).
const EncryptionFscrypt = "fscrypt"

// NewEncryption returns the encryption of a new volume, with a new salt.
func NewEncryption(mode string) (*Encryption, error) {
	salt, err := fscrypt.NewSalt()
	if err != nil {
		return nil, err
	}
	return &Encryption{Mode: mode, Salt: salt}, nil
}

func (e *Encryption) validate() error {
	switch {
	case e == nil:
		return nil
	case e.Mode != EncryptionFscrypt:
		return fmt.Errorf("unknown encryption mode %q", e.Mode)
	case !fscrypt.ValidSalt(e.Salt):
		return errors.New("malformed encryption salt")
	}
	return nil
}

func (e *Encryption) clone() *Encryption {
	if e == nil {
		return nil
	}
	c := *e
	return &c
}

// Source names what a volume was copied from.
type Source struct {
	// Kind is "snapshot" or "volume".
	Kind string `json:"kind"`
	ID   string `json:"id"`
	// Method is how the image was copied (reflink or sparse-copy).
	Method string `json:"method"`
}

// Source kinds.
const (
	SourceSnapshot = "snapshot"
	SourceVolume   = "volume"
)

// Token is the volume's token (its directory name).
func (v *Volume) Token() string { return v.token }

// AttachmentFor returns the attachment of node, if any.
func (v *Volume) AttachmentFor(node string) (Attachment, bool) {
	for _, a := range v.Attachments {
		if a.Node == node {
			return a, true
		}
	}
	return Attachment{}, false
}

func (v *Volume) clone() Volume {
	c := *v
	c.Parameters = maps.Clone(v.Parameters)
	c.Attachments = slices.Clone(v.Attachments)
	if v.Source != nil {
		src := *v.Source
		c.Source = &src
	}
	c.Encryption = v.Encryption.clone()
	return c
}

// CreateRequest describes a new volume. CapacityBytes is final: the caller
// has already rounded it.
type CreateRequest struct {
	Name          string
	CapacityBytes int64
	Provisioning  Provisioning
	AccessType    AccessType
	FSType        string
	Parameters    map[string]string
	// SourceKind and SourceToken name a snapshot or volume of this pool to
	// copy; the caller holds that object's lock.
	SourceKind  string
	SourceToken string
	Ephemeral   bool
	// Encryption of a new volume (NewEncryption); a copy has its origin's.
	Encryption *Encryption
}

// CreateVolume creates the volume, or returns the existing volume of that
// name with created=false (the caller decides whether it is compatible).
func (p *Pool) CreateVolume(ctx context.Context, req CreateRequest) (v Volume, created bool, err error) {
	if req.CapacityBytes <= 0 || req.CapacityBytes%size.MiB != 0 {
		return Volume{}, false, fmt.Errorf("capacity %d is not a positive multiple of 1 MiB", req.CapacityBytes)
	}
	p.mu.Lock()
	if tok, ok := p.names[req.Name]; ok {
		v := p.vols[tok].clone()
		p.mu.Unlock()
		return v, false, nil
	}
	if p.pending[req.Name] {
		p.mu.Unlock()
		return Volume{}, false, errorf(ErrInProgress, "volume %q is being created", req.Name)
	}
	p.pending[req.Name] = true
	p.mu.Unlock()
	release, err := p.reserve(req.CapacityBytes)
	if err != nil {
		p.mu.Lock()
		delete(p.pending, req.Name)
		p.mu.Unlock()
		return Volume{}, false, err
	}
	defer func() {
		p.mu.Lock()
		delete(p.pending, req.Name)
		if err == nil && created {
			vv := v
			p.vols[v.token] = &vv
			p.names[v.Name] = v.token
			p.provisioned += v.CapacityBytes
		}
		p.mu.Unlock()
		release()
	}()

	id, err := volid.New(volid.KindVolume, p.name, p.node)
	if err != nil {
		return Volume{}, false, err
	}
	v = Volume{
		ID: id.String(), Name: req.Name, CapacityBytes: req.CapacityBytes, Provisioning: req.Provisioning,
		AccessType: req.AccessType, FSType: req.FSType, Parameters: maps.Clone(req.Parameters),
		CreatedAt: time.Now().UTC(), Ephemeral: req.Ephemeral, token: id.Token,
		Encryption: req.Encryption.clone(),
	}
	var srcImage *os.File
	switch req.SourceKind {
	case "":
	case SourceSnapshot, SourceVolume:
		src, image, err := p.sourceFor(req.SourceKind, req.SourceToken)
		if err != nil {
			return Volume{}, false, err
		}
		defer image.Close()
		if src.size > req.CapacityBytes {
			return Volume{}, false, errorf(ErrTooSmall, "%s %s holds %s, more than the %s asked for", req.SourceKind, src.id, size.Format(src.size), size.Format(req.CapacityBytes))
		}
		v.Source = &Source{Kind: req.SourceKind, ID: src.id}
		v.NewFilesystemID = true
		// The copied bytes are encrypted as their origin's were: the salt
		// travels with them.
		v.Encryption = src.enc.clone()
		srcImage = image
	default:
		return Volume{}, false, fmt.Errorf("unknown source kind %q", req.SourceKind)
	}
	if err := p.build(ctx, &v, srcImage); err != nil {
		var taken errNameTaken
		if errors.As(err, &taken) {
			klog.InfoS("Another controller created the volume first; returning it", "pool", p.name, "name", req.Name)
			other, gerr := p.Get(taken.token)
			if gerr != nil {
				return Volume{}, false, gerr
			}
			return other, false, nil
		}
		return Volume{}, false, err
	}
	faults.Point("create-renamed")
	klog.V(2).InfoS("Created volume", "pool", p.name, "volumeID", v.ID, "name", v.Name, "bytes", v.CapacityBytes, "provisioning", v.Provisioning)
	return v, true, nil
}

// build makes the volume under .tmp, as a new image or as a copy of
// srcImage (nil: a new image), and renames it into volumes/ once it is whole
// and durable.
func (p *Pool) build(ctx context.Context, v *Volume, srcImage *os.File) (err error) {
	tmp, err := p.newScratch(v.token)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.discard()
		}
	}()
	if srcImage == nil {
		err = makeImage(tmp, v.CapacityBytes, v.Provisioning)
	} else {
		err = copyImage(ctx, srcImage, tmp, v)
	}
	if err != nil {
		return err
	}
	faults.Point("create-image-written")
	commit := func() error { return tmp.commit(filepath.Join(volumesDir, v.token), metaFile, v) }
	if p.shared {
		return p.commitShared(v.Name, v.token, commit)
	}
	return commit()
}

// copyImage copies srcImage into the scratch directory and grows the copy
// to the volume's size.
func copyImage(ctx context.Context, srcImage *os.File, tmp *scratch, v *Volume) error {
	method, err := imagecopy.CopyInto(ctx, srcImage, tmp.dir, imageFile)
	if err != nil {
		return fmt.Errorf("copying %s: %w", v.Source.ID, err)
	}
	v.Source.Method = string(method)
	f, err := tmp.open(imageFile, unix.O_RDWR)
	if err != nil {
		return err
	}
	return resizeFile(f, v.CapacityBytes, v.Provisioning)
}

// resizeFile grows the open image f (and closes it).
func resizeFile(f *os.File, n int64, prov Provisioning) error {
	defer func() { _ = f.Close() }()
	if err := sizeFile(f, n, prov); err != nil {
		return err
	}
	return f.Close()
}

// sizeFile makes f n bytes long (never shorter than it is) and, for thick
// provisioning, allocates every block. fallocate over blocks that are
// already allocated is a no-op, so this also converts thin to thick.
func sizeFile(f *os.File, n int64, prov Provisioning) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat image: %w", err)
	}
	if fi.Size() > n {
		return fmt.Errorf("image is %d bytes, larger than %d", fi.Size(), n)
	}
	if prov == Thick {
		if err := unix.Fallocate(int(f.Fd()), 0, 0, n); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) {
				return errorf(ErrUnsupported, "the pool's filesystem cannot preallocate: use provisioning: thin")
			}
			if errors.Is(err, unix.ENOSPC) {
				return errorf(ErrExhausted, "no space left to preallocate %s", size.Format(n))
			}
			return fmt.Errorf("preallocating image: %w", err)
		}
	} else if fi.Size() < n {
		if err := f.Truncate(n); err != nil {
			return fmt.Errorf("sizing image: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync image: %w", err)
	}
	return nil
}

func makeImage(tmp *scratch, bytes int64, prov Provisioning) error {
	f, err := tmp.create(imageFile)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	// On btrfs, an image without copy-on-write (imagecopy.MarkNoCOW); a
	// failure costs speed, not data.
	if _, err := imagecopy.MarkNoCOW(f); err != nil {
		klog.InfoS("Image keeps copy-on-write", "pool", tmp.p.name, "err", err)
	}
	if err := sizeFile(f, bytes, prov); err != nil {
		return err
	}
	return f.Close()
}

// Get returns the volume with this token, or an error wrapping ErrNotFound.
func (p *Pool) Get(token string) (Volume, error) {
	if p.shared {
		if !volid.IsToken(token) {
			return Volume{}, errorf(ErrNotFound, "volume token %q is malformed", token)
		}
		return p.reload(token)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.vols[token]
	if !ok {
		return Volume{}, errorf(ErrNotFound, "volume %s:%s:%s does not exist", p.name, p.node, token)
	}
	return v.clone(), nil
}

// GetByName returns the volume with this name, if any.
func (p *Pool) GetByName(name string) (Volume, bool) {
	p.mu.Lock()
	tok, ok := p.names[name]
	p.mu.Unlock()
	if !ok && p.shared {
		p.refreshShared()
		p.mu.Lock()
		tok, ok = p.names[name]
		p.mu.Unlock()
	}
	if !ok {
		return Volume{}, false
	}
	if p.shared {
		v, err := p.reload(tok)
		return v, err == nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.vols[tok].clone(), true
}

// ErrUnchanged, returned by an Update function, leaves the metadata as it
// is: Update then returns the volume and no error.
var ErrUnchanged = errors.New("metadata unchanged")

// Update applies fn to a copy of the volume's metadata and stores the result
// atomically. The caller serialises updates of one volume within this
// process; in a shared pool, Update also holds the volume's lock file and
// applies fn to the metadata as it is on disk, so that updates from other
// processes are never lost or overtaken.
func (p *Pool) Update(token string, fn func(v *Volume) error) (Volume, error) {
	if p.shared {
		if !volid.IsToken(token) {
			return Volume{}, errorf(ErrNotFound, "volume token %q is malformed", token)
		}
		unlock, err := p.lockVolume(token)
		if err != nil {
			return Volume{}, err
		}
		defer unlock()
	}
	v, err := p.Get(token)
	if err != nil {
		return Volume{}, err
	}
	if err := fn(&v); errors.Is(err, ErrUnchanged) {
		return v, nil
	} else if err != nil {
		return Volume{}, err
	}
	data, err := json.MarshalIndent(&v, "", "  ")
	if err != nil {
		return Volume{}, fmt.Errorf("encoding metadata: %w", err)
	}
	if err := p.writeAtomic(filepath.Join(volumesDir, token, metaFile), data); err != nil {
		return Volume{}, err
	}
	p.mu.Lock()
	if old, ok := p.vols[token]; ok {
		p.provisioned += v.CapacityBytes - old.CapacityBytes
		vv := v.clone()
		p.vols[token] = &vv
	}
	p.mu.Unlock()
	return v, nil
}

// DeleteVolume removes the volume. Deleting a volume that does not exist
// succeeds.
func (p *Pool) DeleteVolume(token string) error {
	p.mu.Lock()
	v, ok := p.vols[token]
	if !ok {
		p.mu.Unlock()
		return nil
	}
	if p.busy[token] {
		p.mu.Unlock()
		return errorf(ErrInProgress, "volume %s is being deleted", v.ID)
	}
	p.busy[token] = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.busy, token)
		p.mu.Unlock()
	}()
	if p.shared {
		// Another controller may have attached it since the caller looked.
		unlock, err := p.lockVolume(token)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		defer unlock()
		cur, err := p.readMeta(token)
		if err != nil {
			return fmt.Errorf("pool %s: reading volume %s: %w", p.name, token, err)
		}
		if len(cur.Attachments) > 0 {
			return errorf(ErrInUse, "volume %s is attached to node %s: ControllerUnpublishVolume it first", cur.ID, cur.Attachments[0].Node)
		}
	}

	// Rename first: from here on a crash leaves only trash that Open removes.
	trash, err := p.toTrash(filepath.Join(volumesDir, token), token)
	if err != nil {
		return fmt.Errorf("volume %s: %w", v.ID, err)
	}
	faults.Point("delete-trashed")
	p.mu.Lock()
	delete(p.vols, token)
	p.provisioned -= v.CapacityBytes
	if p.names[v.Name] == token {
		delete(p.names, v.Name)
	}
	p.mu.Unlock()
	p.emptyTrash(trash) // the volume is gone for every caller already
	klog.V(2).InfoS("Deleted volume", "pool", p.name, "volumeID", v.ID, "name", v.Name)
	return nil
}

// ExpandVolume grows the volume's image to n bytes. Growth must fit the
// pool's capacity like a new volume; a volume that is already as large is
// returned as it is.
func (p *Pool) ExpandVolume(token string, n int64) (Volume, error) {
	v, err := p.Get(token)
	if err != nil || n <= v.CapacityBytes {
		return v, err
	}
	release, err := p.reserve(n - v.CapacityBytes)
	if err != nil {
		return Volume{}, err
	}
	defer release()
	// Image first, then metadata: a crash in between leaves an image larger
	// than recorded, which the CO's retry of the expansion records.
	if err := p.resizeVolumeImage(token, n, v.Provisioning); err != nil {
		return Volume{}, err
	}
	faults.Point("expand-image-grown")
	v, err = p.Update(token, func(v *Volume) error {
		v.CapacityBytes = max(v.CapacityBytes, n)
		return nil
	})
	if err == nil {
		klog.V(2).InfoS("Expanded volume", "pool", p.name, "volumeID", v.ID, "bytes", n)
	}
	return v, err
}

// SetProvisioning changes a volume between thin and thick. Going thick
// allocates every block of the image now; going thin only stops promising
// that: blocks already allocated stay so until the filesystem in the volume
// discards them (fstrim).
func (p *Pool) SetProvisioning(token string, prov Provisioning) (Volume, error) {
	v, err := p.Get(token)
	if err != nil || v.Provisioning == prov {
		return v, err
	}
	if prov == Thick {
		if err := p.resizeVolumeImage(token, v.CapacityBytes, Thick); err != nil {
			return Volume{}, err
		}
	}
	return p.Update(token, func(v *Volume) error {
		v.Provisioning = prov
		return nil
	})
}

// ClearNewFilesystemID records that a copied volume's filesystem got its own
// identity.
func (p *Pool) ClearNewFilesystemID(token string) error {
	_, err := p.Update(token, func(v *Volume) error {
		v.NewFilesystemID = false
		return nil
	})
	return err
}

// resizeVolumeImage grows the image of a volume, opened beneath the pool
// root and checked (OpenImage).
func (p *Pool) resizeVolumeImage(token string, n int64, prov Provisioning) error {
	f, err := p.OpenImage(token, unix.O_RDWR)
	if err != nil {
		return err
	}
	return resizeFile(f, n, prov)
}

// source is what a new volume is copied from.
type source struct {
	id   string
	size int64
	enc  *Encryption
}

// sourceFor finds the snapshot or volume to copy and opens its image for
// reading, beneath the pool root and checked like every image.
func (p *Pool) sourceFor(kind, token string) (source, *os.File, error) {
	var src source
	rel := filepath.Join(volumesDir, token, imageFile)
	if kind == SourceSnapshot {
		s, err := p.GetSnapshot(token)
		if err != nil {
			return source{}, nil, err
		}
		src, rel = source{id: s.ID, size: s.SizeBytes, enc: s.Encryption}, filepath.Join(snapshotsDir, token, imageFile)
	} else {
		v, err := p.Get(token)
		if err != nil {
			return source{}, nil, err
		}
		src = source{id: v.ID, size: v.CapacityBytes, enc: v.Encryption}
	}
	f, err := p.openImage(rel, unix.O_RDONLY)
	if err != nil {
		return source{}, nil, fmt.Errorf("%s %s: %w", kind, src.id, err)
	}
	return src, f, nil
}
