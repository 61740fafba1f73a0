package pool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/volid"
)

// Snapshot is a snapshot's metadata, as stored in snapshot.json next to its
// read-only image.
type Snapshot struct {
	ID             string `json:"id"`
	Name           string `json:"name"`
	SourceVolumeID string `json:"sourceVolumeID"`
	// SizeBytes is the source volume's size: the smallest volume a restore
	// makes.
	SizeBytes int64     `json:"sizeBytes"`
	CreatedAt time.Time `json:"createdAt"`
	// Method is how the image was copied (reflink or sparse-copy).
	Method string `json:"method"`
	// GroupID is the group snapshot the snapshot belongs to, if any.
	GroupID string `json:"groupID,omitempty"`
	// AccessType and FSType are the source volume's: a restore keeps them.
	// Snapshots made before they were recorded have neither.
	AccessType AccessType `json:"accessType,omitempty"`
	FSType     string     `json:"fsType,omitempty"`
	// Encryption is the source volume's: the image holds its ciphertext.
	Encryption *Encryption `json:"encryption,omitempty"`

	token string
	// charge is what the snapshot counts against the pool's capacity: the
	// bytes its image occupies (snapshotCharge).
	charge int64
}

// Token is the snapshot's token.
func (s *Snapshot) Token() string { return s.token }

// Group is a group snapshot: snapshots of several volumes taken together.
type Group struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	SnapshotIDs []string  `json:"snapshotIDs"`
	CreatedAt   time.Time `json:"createdAt"`

	token string
}

// Token is the group's token.
func (g *Group) Token() string { return g.token }

// snapIndex is the in-memory index of a pool's snapshots and group
// snapshots. A shared pool's is re-read from the share before every use:
// other controllers create and delete snapshots too.
type snapIndex struct {
	snaps      map[string]*Snapshot // token -> snapshot
	snapNames  map[string]string    // name -> token
	groups     map[string]*Group    // token -> group snapshot
	groupNames map[string]string    // name -> token
}

func newSnapIndex() snapIndex {
	return snapIndex{snaps: map[string]*Snapshot{}, snapNames: map[string]string{}, groups: map[string]*Group{}, groupNames: map[string]string{}}
}

// SnapshotRequest describes a new snapshot of a volume of this pool. The
// caller holds the source volume's lock.
type SnapshotRequest struct {
	Name        string
	SourceToken string
	GroupID     string
}

// CreateSnapshot copies the volume's image (a reflink where the pool's
// filesystem can, else a sparse copy) into a read-only snapshot, or returns
// the existing snapshot of that name with created=false. The snapshot
// appears only when the copy is whole, so every snapshot is ready to use.
func (p *Pool) CreateSnapshot(ctx context.Context, req SnapshotRequest) (s Snapshot, created bool, err error) {
	p.refreshSnapshots()
	p.mu.Lock()
	if tok, ok := p.snapNames[req.Name]; ok {
		s := *p.snaps[tok]
		p.mu.Unlock()
		return s, false, nil
	}
	if p.pending["snapshot/"+req.Name] {
		p.mu.Unlock()
		return Snapshot{}, false, errorf(ErrInProgress, "snapshot %q is being created", req.Name)
	}
	p.pending["snapshot/"+req.Name] = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pending, "snapshot/"+req.Name)
		if err == nil {
			ss := s
			p.snaps[s.token] = &ss
			p.snapNames[s.Name] = s.token
		}
		p.mu.Unlock()
	}()

	src, err := p.Get(req.SourceToken)
	if err != nil {
		return Snapshot{}, false, err
	}
	id, err := volid.New(volid.KindSnapshot, p.name, p.node)
	if err != nil {
		return Snapshot{}, false, err
	}
	s = Snapshot{ID: id.String(), Name: req.Name, SourceVolumeID: src.ID, SizeBytes: src.CapacityBytes,
		CreatedAt: time.Now().UTC(), GroupID: req.GroupID, AccessType: src.AccessType, FSType: src.FSType,
		Encryption: src.Encryption.clone(), token: id.Token}
	start := time.Now()
	srcImage, err := p.OpenImage(src.token, unix.O_RDONLY)
	if err != nil {
		return Snapshot{}, false, fmt.Errorf("volume %s: %w", src.ID, err)
	}
	defer srcImage.Close()
	release, err := p.reserveSnapshot(srcImage, src.ID)
	if err != nil {
		return Snapshot{}, false, err
	}
	defer release()
	if err := p.buildSnapshot(ctx, &s, srcImage); err != nil {
		var taken errNameTaken
		if errors.As(err, &taken) {
			klog.InfoS("Another controller created the snapshot first; returning it", "pool", p.name, "name", req.Name)
			other, gerr := p.GetSnapshot(taken.token)
			if gerr != nil {
				return Snapshot{}, false, gerr
			}
			return other, false, nil
		}
		return Snapshot{}, false, err
	}
	klog.V(2).InfoS("Created snapshot", "pool", p.name, "snapshotID", s.ID, "name", s.Name, "source", s.SourceVolumeID,
		"method", s.Method, "duration", time.Since(start))
	return s, true, nil
}

func (p *Pool) buildSnapshot(ctx context.Context, s *Snapshot, srcImage *os.File) (err error) {
	tmp, err := p.newScratch("snap-" + s.token)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.discard()
		}
	}()
	method, err := imagecopy.CopyInto(ctx, srcImage, tmp.dir, imageFile)
	if err != nil {
		return fmt.Errorf("copying %s: %w", s.SourceVolumeID, err)
	}
	s.Method = string(method)
	faults.Point("snapshot-copied")
	img, err := tmp.open(imageFile, unix.O_RDONLY)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	err = unix.Fstat(int(img.Fd()), &st)
	if err == nil {
		err = unix.Fchmod(int(img.Fd()), 0o400)
	}
	_ = img.Close()
	if err != nil {
		return fmt.Errorf("making %s read-only: %w", img.Name(), err)
	}
	s.charge = st.Blocks * 512
	commit := func() error { return tmp.commit(filepath.Join(snapshotsDir, s.token), snapshotMeta, s) }
	if !p.shared {
		return commit()
	}
	return p.underCreateLock(func() error {
		if err := p.loadSnapshots(false); err != nil {
			return err
		}
		if other, ok := p.snapshotNamed(s.Name); ok && other != s.token {
			return errNameTaken{token: other}
		}
		return commit()
	})
}

// snapshotNamed returns the token of the snapshot with this name.
func (p *Pool) snapshotNamed(name string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	tok, ok := p.snapNames[name]
	return tok, ok
}

// GetSnapshot returns the snapshot with this token, or an error wrapping ErrNotFound.
func (p *Pool) GetSnapshot(token string) (Snapshot, error) {
	p.refreshSnapshots()
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.snaps[token]
	if !ok {
		return Snapshot{}, errorf(ErrNotFound, "snapshot %s:%s:snap-%s does not exist", p.name, p.node, token)
	}
	return *s, nil
}

// OpenSnapshotImage returns the snapshot with this token and its image,
// opened read-only beneath the pool root and checked like every image. The
// caller reads the image through the returned file and closes it; a
// snapshot deleted meanwhile stays readable through it.
func (p *Pool) OpenSnapshotImage(token string) (Snapshot, *os.File, error) {
	s, err := p.GetSnapshot(token)
	if err != nil {
		return Snapshot{}, nil, err
	}
	f, err := p.openImage(filepath.Join(snapshotsDir, token, imageFile), unix.O_RDONLY)
	if err != nil {
		return Snapshot{}, nil, fmt.Errorf("snapshot %s: %w", s.ID, err)
	}
	return s, f, nil
}

// GetSnapshotByName returns the snapshot with this name, if any.
func (p *Pool) GetSnapshotByName(name string) (Snapshot, bool) {
	p.refreshSnapshots()
	p.mu.Lock()
	defer p.mu.Unlock()
	tok, ok := p.snapNames[name]
	if !ok {
		return Snapshot{}, false
	}
	return *p.snaps[tok], true
}

// ListSnapshots returns all snapshots, sorted by ID.
func (p *Pool) ListSnapshots() []Snapshot {
	p.refreshSnapshots()
	p.mu.Lock()
	out := make([]Snapshot, 0, len(p.snaps))
	for _, s := range p.snaps {
		out = append(out, *s)
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// DeleteSnapshot removes a snapshot; a snapshot that does not exist is
// already deleted.
func (p *Pool) DeleteSnapshot(token string) error {
	s, err := p.GetSnapshot(token)
	if errors.Is(err, ErrNotFound) {
		if p.shared {
			// The index of a shared pool leaves out the members of a
			// group whose record is not written (a failed group snapshot
			// removing its members): their directories may be there.
			return p.removeSnapshot(token)
		}
		return nil
	}
	if err := p.removeSnapshot(token); err != nil {
		return fmt.Errorf("deleting snapshot %s: %w", s.ID, err)
	}
	klog.V(2).InfoS("Deleted snapshot", "pool", p.name, "snapshotID", s.ID)
	return nil
}

// removeSnapshot trashes a snapshot's directory and drops it from the
// index. A directory already gone was removed by another controller of a
// shared pool, or by an earlier attempt.
func (p *Pool) removeSnapshot(token string) error {
	if err := p.trash(filepath.Join(snapshotsDir, token), "snap-"+token); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	p.mu.Lock()
	if s, ok := p.snaps[token]; ok {
		delete(p.snaps, token)
		if p.snapNames[s.Name] == token {
			delete(p.snapNames, s.Name)
		}
	}
	p.mu.Unlock()
	return nil
}

// trash moves dir into .trash (durably: from then on a crash leaves only
// trash that Open removes) and removes it.
func (p *Pool) trash(rel, name string) error {
	dst, err := p.toTrash(rel, name)
	if err != nil {
		return err
	}
	p.emptyTrash(dst)
	return nil
}

// toTrash moves rel (relative to the pool root) to .trash/name, durably:
// from then on a crash leaves only trash that Open removes.
func (p *Pool) toTrash(rel, name string) (string, error) {
	dst := filepath.Join(trashDir, name)
	if err := p.renameBeneath(rel, dst); err != nil {
		return "", fmt.Errorf("moving %s to trash: %w", rel, err)
	}
	if err := syncDir(filepath.Join(p.root, filepath.Dir(rel))); err != nil {
		return "", err
	}
	return dst, nil
}

// emptyTrash removes what toTrash moved; what it cannot remove, the next
// start does.
func (p *Pool) emptyTrash(dst string) {
	if err := p.removeBeneath(dst); err != nil {
		klog.ErrorS(err, "Could not remove deleted files; the next start will", "pool", p.name, "path", dst)
	}
}

// CreateGroup records a group snapshot whose member snapshots the caller
// has made (with GroupID set to id). Members whose group record never got
// written are removed by Open.
func (p *Pool) CreateGroup(id volid.ID, name string, snapshotIDs []string) (Group, error) {
	g := Group{ID: id.String(), Name: name, SnapshotIDs: slices.Clone(snapshotIDs), CreatedAt: time.Now().UTC(), token: id.Token}
	tmp, err := p.newScratch("group-" + id.Token)
	if err != nil {
		return Group{}, err
	}
	final := filepath.Join(groupsDir, id.Token)
	commit := func() error { return tmp.commit(final, groupMeta, &g) }
	if p.shared {
		commit = func() error {
			return p.underCreateLock(func() error {
				if err := p.loadSnapshots(false); err != nil {
					return err
				}
				p.mu.Lock()
				_, taken := p.groupNames[name]
				p.mu.Unlock()
				if taken {
					// The caller removes its members; a retry finds the other's group.
					return errorf(ErrInProgress, "group snapshot %q was just created by another controller", name)
				}
				return tmp.commit(final, groupMeta, &g)
			})
		}
	}
	if err := commit(); err != nil {
		tmp.discard()
		return Group{}, fmt.Errorf("recording group snapshot %s: %w", g.ID, err)
	}
	p.mu.Lock()
	gg := g
	p.groups[g.token] = &gg
	p.groupNames[g.Name] = g.token
	p.mu.Unlock()
	klog.V(2).InfoS("Created group snapshot", "pool", p.name, "groupSnapshotID", g.ID, "name", name, "snapshots", len(snapshotIDs))
	return g, nil
}

// GetGroup returns the group snapshot with this token, or NotFound.
func (p *Pool) GetGroup(token string) (Group, error) {
	p.refreshSnapshots()
	p.mu.Lock()
	defer p.mu.Unlock()
	g, ok := p.groups[token]
	if !ok {
		return Group{}, errorf(ErrNotFound, "group snapshot %s:%s:group-%s does not exist", p.name, p.node, token)
	}
	c := *g
	c.SnapshotIDs = slices.Clone(g.SnapshotIDs)
	return c, nil
}

// GetGroupByName returns the group snapshot with this name, if any.
func (p *Pool) GetGroupByName(name string) (Group, bool) {
	p.refreshSnapshots()
	p.mu.Lock()
	defer p.mu.Unlock()
	g, ok := p.groups[p.groupNames[name]]
	if !ok {
		return Group{}, false
	}
	c := *g
	c.SnapshotIDs = slices.Clone(g.SnapshotIDs)
	return c, true
}

// DeleteGroup removes a group snapshot and its member snapshots. The record
// goes first: members left by a crash are orphans that Open removes.
func (p *Pool) DeleteGroup(token string) error {
	g, err := p.GetGroup(token)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	// Already gone: another controller of a shared pool deleted it (as
	// removeSnapshot, on every pool).
	if err := p.trash(filepath.Join(groupsDir, token), "group-"+token); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("deleting group snapshot %s: %w", g.ID, err)
	}
	p.mu.Lock()
	delete(p.groups, token)
	if p.groupNames[g.Name] == token {
		delete(p.groupNames, g.Name)
	}
	p.mu.Unlock()
	// The members, by the record: with the record gone, a shared pool's
	// index no longer lists them.
	for _, id := range g.SnapshotIDs {
		sid, err := volid.ParseKind(id, volid.KindSnapshot)
		if err != nil {
			klog.ErrorS(err, "Group snapshot record names a malformed member", "pool", p.name, "groupSnapshotID", g.ID)
			continue
		}
		if err := p.removeSnapshot(sid.Token); err != nil {
			return fmt.Errorf("deleting member %s of group snapshot %s: %w", id, g.ID, err)
		}
	}
	klog.V(2).InfoS("Deleted group snapshot", "pool", p.name, "groupSnapshotID", g.ID)
	return nil
}

// loadSnapshots reads the snapshots and groups into the index. Member
// snapshots of groups whose record was never written or was deleted are
// removed when clean is set (no other process uses the pool), else left out
// of the index.
func (p *Pool) loadSnapshots(clean bool) error {
	idx := newSnapIndex()
	if err := p.loadDir(groupsDir, groupMeta, func(tok string, data []byte) error {
		g := &Group{}
		if err := json.Unmarshal(data, g); err != nil {
			return err
		}
		if id, err := volid.ParseKind(g.ID, volid.KindGroup); err != nil || id.Token != tok {
			return fmt.Errorf("metadata names ID %q", g.ID)
		}
		g.token = tok
		idx.groups[tok], idx.groupNames[g.Name] = g, tok
		return nil
	}); err != nil {
		return err
	}
	groupIDs := map[string]bool{}
	for _, g := range idx.groups {
		groupIDs[g.ID] = true
	}
	if err := p.loadDir(snapshotsDir, snapshotMeta, func(tok string, data []byte) error {
		s := &Snapshot{}
		if err := json.Unmarshal(data, s); err != nil {
			return err
		}
		if id, err := volid.ParseKind(s.ID, volid.KindSnapshot); err != nil || id.Token != tok {
			return fmt.Errorf("%w: metadata names ID %q", ErrUntrusted, s.ID)
		}
		if err := s.validate(); err != nil {
			return fmt.Errorf("%w: %w", ErrUntrusted, err)
		}
		s.token = tok
		if s.GroupID != "" && !groupIDs[s.GroupID] {
			if !clean {
				return nil
			}
			klog.InfoS("Removing member of an unfinished or deleted group snapshot", "pool", p.name, "snapshotID", s.ID, "groupSnapshotID", s.GroupID)
			return p.trash(filepath.Join(snapshotsDir, tok), "snap-"+tok)
		}
		charge, err := allocatedBytes(filepath.Join(p.root, snapshotsDir, tok, imageFile))
		if err != nil {
			return err
		}
		s.charge = charge
		idx.snaps[tok], idx.snapNames[s.Name] = s, tok
		return nil
	}); err != nil {
		return err
	}
	p.mu.Lock()
	p.snapIndex = idx
	p.mu.Unlock()
	return nil
}

// refreshSnapshots re-reads a shared pool's snapshots and groups: other
// controllers create and delete them. A local pool's index is always
// current.
func (p *Pool) refreshSnapshots() {
	if !p.shared {
		return
	}
	if err := p.loadSnapshots(false); err != nil {
		klog.ErrorS(err, "Could not rescan the snapshots of a shared pool", "pool", p.name)
	}
}

// loadDir calls load for the metadata of every object directory in dir.
// Objects whose metadata cannot be read are reported and left alone.
func (p *Pool) loadDir(dir, meta string, load func(token string, data []byte) error) error {
	entries, err := os.ReadDir(filepath.Join(p.root, dir))
	if err != nil {
		return fmt.Errorf("pool %s: reading %s: %w", p.name, dir, err)
	}
	for _, e := range entries {
		if !volid.IsToken(e.Name()) {
			klog.InfoS("Ignoring unknown entry in pool", "pool", p.name, "entry", filepath.Join(dir, e.Name()))
			continue
		}
		data, err := p.readBeneath(filepath.Join(dir, e.Name(), meta))
		if err == nil {
			err = load(e.Name(), data)
		}
		rel := filepath.Join(dir, e.Name())
		bad := err != nil && !errors.Is(err, os.ErrNotExist) // gone meanwhile: deleted by another controller
		if bad && !p.isInvalid(rel) {
			klog.ErrorS(err, "Skipping entry with unreadable metadata", "pool", p.name, "entry", rel)
		}
		p.markInvalid(rel, bad)
	}
	return nil
}
