package driver

import (
	"context"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// GroupControllerGetCapabilities reports group snapshots.
func (d *Controller) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
		}},
	}}}, nil
}

// CreateVolumeGroupSnapshot snapshots several volumes of one pool together:
// their filesystems staged on this node are all frozen while the images
// are copied, so the snapshots are consistent with each other.
func (d *Controller) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	if err := checkName(req.GetName()); err != nil {
		return nil, err
	}
	srcIDs := slices.Clone(req.GetSourceVolumeIds())
	if len(srcIDs) == 0 {
		return nil, invalidf("source volume IDs are missing")
	}
	if err := checkSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	slices.Sort(srcIDs)
	if len(slices.Compact(slices.Clone(srcIDs))) != len(srcIDs) {
		return nil, invalidf("source volume IDs repeat a volume")
	}
	var p *pool.Pool
	tokens := make([]string, 0, len(srcIDs))
	for _, id := range srcIDs {
		vp, vid, err := d.pools.resolve(id, volid.KindVolume)
		if err != nil {
			return nil, err
		}
		if p != nil && vp != p {
			return nil, invalidf("the volumes of a group snapshot must share one pool; %s is in pool %s, not %s", id, vp.Name(), p.Name())
		}
		if _, err := vp.Get(vid.Token); err != nil {
			return nil, err
		}
		p = vp
		tokens = append(tokens, vid.Token)
	}
	if g, ok := p.GetGroupByName(req.GetName()); ok {
		return d.existingGroup(p, g, srcIDs)
	}
	for _, id := range srcIDs {
		unlock, err := d.lockVolume(id)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	gid, err := volid.New(volid.KindGroup, p.Name(), p.Node())
	if err != nil {
		return nil, err
	}
	copyCtx, thaw, err := d.freeze(ctx, p, tokens)
	if err != nil {
		return nil, err
	}
	var snaps []pool.Snapshot
	for _, tok := range tokens {
		var s pool.Snapshot
		// A member's name is derived from the group, so a retry after a
		// failure finds no stale member under the same name.
		s, _, err = p.CreateSnapshot(copyCtx, pool.SnapshotRequest{Name: gid.String() + "/" + tok, SourceToken: tok, GroupID: gid.String()})
		if err != nil {
			break
		}
		snaps = append(snaps, s)
	}
	if terr := thaw(); terr != nil {
		klog.ErrorS(terr, "Could not thaw filesystems after a group snapshot", "groupSnapshotID", gid.String())
	}
	if err == nil {
		var ids []string
		for _, s := range snaps {
			ids = append(ids, s.ID)
		}
		_, err = p.CreateGroup(gid, req.GetName(), ids)
	}
	if err != nil {
		for _, s := range snaps {
			if derr := p.DeleteSnapshot(s.Token()); derr != nil {
				klog.ErrorS(derr, "Could not remove a member of a failed group snapshot; the next start will", "snapshotID", s.ID)
			}
		}
		return nil, err
	}
	g, err := p.GetGroup(gid.Token)
	if err != nil {
		return nil, err
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.csiGroup(p, g)}, nil
}

// existingGroup answers a repeated CreateVolumeGroupSnapshot.
func (d *Controller) existingGroup(p *pool.Pool, g pool.Group, srcIDs []string) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	gs := d.csiGroup(p, g)
	var have []string
	for _, s := range gs.GetSnapshots() {
		have = append(have, s.GetSourceVolumeId())
	}
	slices.Sort(have)
	if !slices.Equal(have, srcIDs) {
		return nil, alreadyExistsf("group snapshot %q exists for volumes %v", g.Name, have)
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: gs}, nil
}

func (d *Controller) csiGroup(p *pool.Pool, g pool.Group) *csi.VolumeGroupSnapshot {
	gs := &csi.VolumeGroupSnapshot{GroupSnapshotId: g.ID, CreationTime: timestamppb.New(g.CreatedAt), ReadyToUse: true}
	for _, id := range g.SnapshotIDs {
		sid, err := volid.ParseKind(id, volid.KindSnapshot)
		if err != nil {
			continue
		}
		s, err := p.GetSnapshot(sid.Token)
		if err != nil {
			gs.ReadyToUse = false // a member is missing
			continue
		}
		gs.Snapshots = append(gs.Snapshots, d.csiSnapshot(s))
	}
	return gs
}

// GetVolumeGroupSnapshot returns a group snapshot.
func (d *Controller) GetVolumeGroupSnapshot(_ context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	if req.GetGroupSnapshotId() == "" {
		return nil, invalidf("group snapshot ID is missing")
	}
	p, gid, err := d.pools.resolve(req.GetGroupSnapshotId(), volid.KindGroup)
	if err != nil {
		return nil, err
	}
	g, err := p.GetGroup(gid.Token)
	if err != nil {
		return nil, err
	}
	if err := checkMembers(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: d.csiGroup(p, g)}, nil
}

// checkMembers refuses snapshot IDs the CO names that are not the group's.
func checkMembers(g pool.Group, ids []string) error {
	for _, id := range ids {
		if !slices.Contains(g.SnapshotIDs, id) {
			return invalidf("snapshot %s is not a member of group snapshot %s", id, g.ID)
		}
	}
	return nil
}

// DeleteVolumeGroupSnapshot deletes a group snapshot and its members; one
// that does not exist is already deleted.
func (d *Controller) DeleteVolumeGroupSnapshot(_ context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if id == "" {
		return nil, invalidf("group snapshot ID is missing")
	}
	gid, err := volid.ParseKind(id, volid.KindGroup)
	if err != nil {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	p, _, err := d.pools.resolve(id, volid.KindGroup)
	if err != nil {
		return nil, preconditionf("group snapshot %s belongs to pool %s on node %s, which this controller does not serve", id, gid.Pool, gid.Node)
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	g, err := p.GetGroup(gid.Token)
	if isNotFound(err) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	} else if err != nil {
		return nil, err
	}
	if err := checkMembers(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	if err := p.DeleteGroup(gid.Token); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}
