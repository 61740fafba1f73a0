package driver

import (
	"context"
	"errors"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// checkSnapshotParams refuses snapshot parameters: Spool has none of its
// own, and keys of the sidecars are theirs.
func checkSnapshotParams(in map[string]string) error {
	for k := range in {
		if !strings.HasPrefix(k, reservedParamPrefix) {
			return invalidf("unknown snapshot parameter %q: Spool takes none", k)
		}
	}
	return nil
}

// CreateSnapshot copies a volume's image into a read-only snapshot. A
// filesystem staged on this node is frozen for the copy, so the snapshot
// holds a consistent filesystem.
func (d *Controller) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := checkName(req.GetName()); err != nil {
		return nil, err
	}
	if req.GetSourceVolumeId() == "" {
		return nil, invalidf("source volume ID is missing")
	}
	if err := checkSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	p, vid, err := d.pools.resolve(req.GetSourceVolumeId(), volid.KindVolume)
	if err != nil {
		return nil, err
	}
	if err := d.checkTopology(p, req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	if s, ok := d.pools.snapshotNamed(req.GetName()); ok {
		if s.SourceVolumeID != req.GetSourceVolumeId() {
			return nil, alreadyExistsf("snapshot %q exists for volume %s", s.Name, s.SourceVolumeID)
		}
		return &csi.CreateSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
	}
	unlock, err := d.lockVolume(vid.String())
	if err != nil {
		return nil, err
	}
	defer unlock()
	copyCtx, thaw, err := d.freeze(ctx, p, []string{vid.Token})
	if err != nil {
		return nil, err
	}
	s, _, err := p.CreateSnapshot(copyCtx, pool.SnapshotRequest{Name: req.GetName(), SourceToken: vid.Token})
	if terr := thaw(); terr != nil {
		klog.ErrorS(terr, "Could not thaw a filesystem after a snapshot", "volumeID", vid.String())
	}
	if err != nil {
		return nil, d.frozenTooLong(ctx, copyCtx, err)
	}
	if s.SourceVolumeID != req.GetSourceVolumeId() {
		return nil, alreadyExistsf("snapshot %q exists for volume %s", s.Name, s.SourceVolumeID)
	}
	return &csi.CreateSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
}

// freeze freezes, for a copy, the filesystems of the volumes staged by the
// node service of this process, if it runs one (localNode).
func (d *Controller) freeze(ctx context.Context, p *pool.Pool, tokens []string) (context.Context, func() error, error) {
	if d.local == nil {
		return ctx, func() error { return nil }, nil
	}
	return d.local.freezeStaged(ctx, p, tokens)
}

// freezeStaged freezes the filesystems of the given volumes that are
// mounted on this node, for a copy. The returned context bounds the copy by
// --max-freeze when anything was frozen: a pod's writes hang while its
// filesystem is frozen, so a copy that takes longer is given up. The
// returned thaw undoes every freeze; it is never nil.
func (d *Node) freezeStaged(ctx context.Context, p *pool.Pool, tokens []string) (context.Context, func() error, error) {
	var thaws []func() error
	thawAll := func() error {
		var errs []error
		for _, t := range thaws {
			errs = append(errs, t())
		}
		return errors.Join(errs...)
	}
	if d.kernel.Loops == nil || d.kernel.Mounter == nil {
		return ctx, thawAll, nil
	}
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return ctx, thawAll, err
	}
	for _, tok := range tokens {
		dev, err := d.ownDevice(p, tok)
		if err != nil {
			return ctx, thawAll, err
		}
		if dev == nil {
			continue
		}
		for _, m := range mounts {
			if !fs.IsDeviceMount(m, dev.Path, dev.Rdev) || slices.Contains(m.MountOptions, "ro") {
				continue
			}
			thaw, err := d.kernel.Mounter.Freeze(m.MountPoint)
			if err != nil {
				_ = thawAll()
				thaws = nil
				return ctx, func() error { return nil }, status.Errorf(codes.Internal, "freezing volume for a consistent snapshot: %v", err)
			}
			thaws = append(thaws, thaw)
			faults.Point("snapshot-frozen")
			break // one mount of a filesystem freezes it everywhere
		}
	}
	if len(thaws) == 0 {
		return ctx, thawAll, nil
	}
	copyCtx, stop := context.WithTimeout(ctx, d.opts.MaxFreeze)
	return copyCtx, func() error { stop(); return thawAll() }, nil
}

// frozenTooLong explains a copy given up because it outlasted --max-freeze
// (copyCtx expired while the caller's ctx did not); other errors pass.
func (d *Controller) frozenTooLong(ctx, copyCtx context.Context, err error) error {
	if errors.Is(err, context.DeadlineExceeded) && copyCtx.Err() != nil && ctx.Err() == nil {
		return status.Errorf(codes.DeadlineExceeded, "the copy took longer than --max-freeze (%s) while the volume's filesystem was frozen, so it was thawed and the copy given up: copies are instant on a pool filesystem with reflinks (xfs, btrfs); or raise --max-freeze", d.opts.MaxFreeze)
	}
	return err
}

// csiSnapshot describes a snapshot. Its accessible topology is left out:
// the field is optional, the snapshot ID already names its node, and
// csi-test v5.6.0 compares a returned topology with reflect-based equality
// that never holds for a protobuf message decoded from the wire.
func (d *Controller) csiSnapshot(s pool.Snapshot) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:      s.ID,
		SourceVolumeId:  s.SourceVolumeID,
		SizeBytes:       s.SizeBytes,
		CreationTime:    timestamppb.New(s.CreatedAt),
		ReadyToUse:      true,
		GroupSnapshotId: s.GroupID,
	}
}

// DeleteSnapshot deletes a snapshot; one that does not exist is already
// deleted. Members of a group snapshot are deleted with their group.
func (d *Controller) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, invalidf("snapshot ID is missing")
	}
	sid, err := volid.ParseKind(id, volid.KindSnapshot)
	if err != nil {
		klog.V(2).InfoS("Deleting a malformed snapshot ID: nothing to do", "snapshotID", id, "err", err)
		return &csi.DeleteSnapshotResponse{}, nil
	}
	p, _, err := d.pools.resolve(id, volid.KindSnapshot)
	if err != nil {
		return nil, preconditionf("snapshot %s belongs to pool %s on node %s, which this controller does not serve", id, sid.Pool, sid.Node)
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	s, err := p.GetSnapshot(sid.Token)
	if isNotFound(err) {
		return &csi.DeleteSnapshotResponse{}, nil
	} else if err != nil {
		return nil, err
	}
	if s.GroupID != "" {
		return nil, preconditionf("snapshot %s belongs to group snapshot %s: delete the group snapshot", id, s.GroupID)
	}
	if err := p.DeleteSnapshot(sid.Token); err != nil {
		return nil, err
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

// GetSnapshot returns one snapshot.
func (d *Controller) GetSnapshot(_ context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, invalidf("snapshot ID is missing")
	}
	p, sid, err := d.pools.resolve(req.GetSnapshotId(), volid.KindSnapshot)
	if err != nil {
		return nil, err
	}
	s, err := p.GetSnapshot(sid.Token)
	if err != nil {
		return nil, err
	}
	return &csi.GetSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
}

// ListSnapshots lists snapshots in ID order, optionally only one snapshot
// or the snapshots of one volume. The token is the ID to resume from.
func (d *Controller) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, invalidf("max_entries must not be negative")
	}
	start := req.GetStartingToken()
	if start != "" {
		if _, err := volid.ParseKind(start, volid.KindSnapshot); err != nil {
			return nil, abortedf("starting token %q is not valid: %v", start, err)
		}
	}
	all := d.pools.snapshots(func(s pool.Snapshot) bool {
		return s.ID >= start &&
			(req.GetSnapshotId() == "" || s.ID == req.GetSnapshotId()) &&
			(req.GetSourceVolumeId() == "" || s.SourceVolumeID == req.GetSourceVolumeId())
	})
	resp := &csi.ListSnapshotsResponse{}
	for i, s := range all {
		if i == pageSize(req.GetMaxEntries()) {
			resp.NextToken = s.ID
			break
		}
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: d.csiSnapshot(s)})
	}
	return resp, nil
}
