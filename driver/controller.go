package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

// Publish context keys: NodeStage checks them against the attach record.
const (
	ctxNode       = "spool.csi.dev/node"
	ctxGeneration = "spool.csi.dev/generation"
	ctxReadOnly   = "spool.csi.dev/readonly"
	// ctxAttachedBy = "node" says that an attach controller without access
	// to the node-local pool published the volume: the node checks the
	// attachment against the pool and records it itself.
	ctxAttachedBy = "spool.csi.dev/attached-by"
)

// ControllerGetCapabilities lists the controller RPCs Spool implements.
func (d *Controller) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	rpcs := []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_MODIFY_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
	}
	if d.attachOnly() {
		// Without pools, only attach is served (see attachonly.go): the
		// resizer then leaves expansion to the node.
		rpcs = []csi.ControllerServiceCapability_RPC_Type{
			csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
			csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
			csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		}
	}
	var caps []*csi.ControllerServiceCapability
	for _, t := range rpcs {
		caps = append(caps, &csi.ControllerServiceCapability{
			Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}},
		})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// CreateVolume creates a volume image in a pool, blank or as a copy of a
// snapshot or a volume, or returns the existing volume of the same name when
// the request is compatible with it.
func (d *Controller) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := checkName(req.GetName()); err != nil {
		return nil, err
	}
	vc, err := parseCapabilities(req.GetVolumeCapabilities())
	if err != nil {
		return nil, err
	}
	prm, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if err := applyMutableParams(&prm, req.GetMutableParameters()); err != nil {
		return nil, err
	}
	src, err := d.contentSource(req.GetVolumeContentSource())
	if err != nil {
		return nil, err
	}
	if err := checkCopyKind(src, vc); err != nil {
		return nil, err
	}
	if err := checkEncryption(prm, vc, src); err != nil {
		return nil, err
	}
	if src != nil && prm.pool == "" {
		prm.pool = src.pool.Name() // copies stay in their origin's pool
	}
	p, ok := d.pools.get(prm.pool)
	if !ok {
		return nil, invalidf("pool %q is not served here (pools: %v)", prm.pool, d.pools.names())
	}
	if src != nil && src.pool != p {
		return nil, invalidf("%s %s is in pool %s: a copy is made in the pool of its origin, not in %s", src.kind, src.id, src.pool.Name(), p.Name())
	}
	for _, c := range req.GetVolumeCapabilities() {
		if err := checkModeForPool(p, c); err != nil {
			return nil, err
		}
	}
	if err := d.checkTopology(p, req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	n, err := volumeSize(req.GetCapacityRange(), vc.fsType)
	if err != nil {
		return nil, err
	}
	if src != nil && src.size > n {
		if lim := req.GetCapacityRange().GetLimitBytes(); lim > 0 && lim < src.size {
			return nil, status.Errorf(codes.OutOfRange, "%s %s holds %d bytes, more than the limit of %d", src.kind, src.id, src.size, lim)
		}
		n = src.size
	}
	// Names are unique across the pools: one look finds the name anywhere.
	holder, v, exists := d.pools.volumeNamed(req.GetName())
	if exists && holder != p {
		return nil, alreadyExistsf("volume %q exists in pool %s", v.Name, holder.Name())
	}
	creq := pool.CreateRequest{
		Name: req.GetName(), CapacityBytes: n, Provisioning: prm.provisioning,
		AccessType: vc.accessType, FSType: vc.fsType, Parameters: req.GetParameters(),
	}
	if src != nil {
		creq.SourceKind, creq.SourceToken = src.kind, src.token
	} else if prm.encryption != "" && !exists {
		if creq.Encryption, err = pool.NewEncryption(prm.encryption); err != nil {
			return nil, err
		}
	}
	if src != nil && !exists {
		// The origin must not go away or change while it is copied.
		unlock, err := d.lockVolume(src.id)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	copyCtx, thaw := ctx, func() error { return nil }
	if src != nil && !exists && src.kind == pool.SourceVolume {
		// A clone of a volume in use copies a frozen, consistent filesystem.
		if copyCtx, thaw, err = d.freeze(ctx, p, []string{src.token}); err != nil {
			return nil, err
		}
	}
	v, created, err := p.CreateVolume(copyCtx, creq)
	if terr := thaw(); terr != nil {
		klog.ErrorS(terr, "Could not thaw a filesystem after cloning it", "volumeID", src.id)
	}
	if err != nil {
		return nil, d.frozenTooLong(ctx, copyCtx, err)
	}
	if !created {
		if err := compatible(v, req, prm, vc, src); err != nil {
			return nil, err
		}
		klog.V(4).InfoS("Volume already exists", "name", v.Name, "volumeID", v.ID)
	}
	return &csi.CreateVolumeResponse{Volume: d.csiVolume(p, v)}, nil
}

// contentSrc is the snapshot or volume a new volume is copied from.
type contentSrc struct {
	kind  string // pool.SourceSnapshot or pool.SourceVolume
	id    string
	token string
	size  int64
	pool  *pool.Pool
	// accessType and fsType of the origin ("" when a snapshot made before
	// they were recorded outlived its source volume).
	accessType pool.AccessType
	fsType     string
	// encrypted: the origin's bytes are encrypted, and so are the copy's.
	encrypted bool
}

// checkCopyKind refuses a copy that would change what its bytes are: a
// block volume's bytes were written by a tenant as a raw device, and
// mounting them as a filesystem would have the host's kernel and mkfs
// parse tenant-made metadata; a filesystem restored under another fsType
// cannot be mounted.
func checkCopyKind(src *contentSrc, vc volumeCaps) error {
	switch {
	case src == nil || src.accessType == "":
		return nil
	case src.accessType != vc.accessType:
		return invalidf("%s %s holds a %s volume's bytes; a copy keeps its origin's access type and cannot be a %s volume", src.kind, src.id, src.accessType, vc.accessType)
	case vc.accessType == pool.Mount && vc.fsType != "" && fsTypeOrDefault(src.fsType) != vc.fsType:
		return invalidf("%s %s holds a %s filesystem; a copy keeps it and cannot be %s", src.kind, src.id, fsTypeOrDefault(src.fsType), vc.fsType)
	}
	return nil
}

// contentSource resolves a CreateVolume content source. A source that does
// not exist is NotFound.
func (d *Controller) contentSource(cs *csi.VolumeContentSource) (*contentSrc, error) {
	switch {
	case cs == nil:
		return nil, nil
	case cs.GetSnapshot() != nil:
		id := cs.GetSnapshot().GetSnapshotId()
		p, sid, err := d.pools.resolve(id, volid.KindSnapshot)
		if err != nil {
			return nil, err
		}
		s, err := p.GetSnapshot(sid.Token)
		if err != nil {
			return nil, err
		}
		src := &contentSrc{kind: pool.SourceSnapshot, id: id, token: sid.Token, size: s.SizeBytes, pool: p,
			accessType: s.AccessType, fsType: s.FSType, encrypted: s.Encryption != nil}
		if src.accessType == "" {
			// Made before snapshots recorded it: its source, if it is
			// still there, says.
			if _, v, err := d.pools.volume(s.SourceVolumeID); err == nil {
				src.accessType, src.fsType = v.AccessType, v.FSType
			} else {
				klog.InfoS("Snapshot records no access type and its source volume is gone: the restore is made as asked", "snapshotID", id, "sourceVolumeID", s.SourceVolumeID)
			}
		}
		return src, nil
	case cs.GetVolume() != nil:
		id := cs.GetVolume().GetVolumeId()
		p, v, err := d.pools.volume(id)
		if err != nil {
			return nil, err
		}
		return &contentSrc{kind: pool.SourceVolume, id: id, token: v.Token(), size: v.CapacityBytes, pool: p,
			accessType: v.AccessType, fsType: v.FSType, encrypted: v.Encryption != nil}, nil
	}
	return nil, invalidf("volume content source names neither a snapshot nor a volume")
}

// compatible checks that an existing volume satisfies a repeated
// CreateVolume with the same name.
func compatible(v pool.Volume, req *csi.CreateVolumeRequest, prm params, vc volumeCaps, src *contentSrc) error {
	switch {
	case (src == nil) != (v.Source == nil) || (src != nil && src.id != v.Source.ID):
		return alreadyExistsf("volume %q exists with another content source", v.Name)
	case !sizeFits(v.CapacityBytes, req.GetCapacityRange()):
		return alreadyExistsf("volume %q exists with %d bytes, outside the requested range", v.Name, v.CapacityBytes)
	case v.Provisioning != prm.provisioning:
		return alreadyExistsf("volume %q exists with %s provisioning", v.Name, v.Provisioning)
	case v.AccessType != vc.accessType:
		return alreadyExistsf("volume %q exists with %s access", v.Name, v.AccessType)
	case v.FSType != vc.fsType:
		return alreadyExistsf("volume %q exists with filesystem %q", v.Name, v.FSType)
	case (v.Encryption != nil) != (prm.encryption != "" || (src != nil && src.encrypted)):
		return alreadyExistsf("volume %q exists with encryption %s", v.Name, encryptionOf(v))
	}
	return nil
}

// checkTopology refuses a volume whose accessibility requirements exclude the
// node that owns the pool.
func (d *core) checkTopology(p *pool.Pool, r *csi.TopologyRequirement) error {
	if len(r.GetRequisite()) == 0 {
		return nil
	}
	for _, t := range r.GetRequisite() {
		if d.topologyMatches(p, t) {
			return nil
		}
	}
	if p.Shared() {
		return status.Errorf(codes.ResourceExhausted, "shared pool %s is mounted on no node the requisite topology allows (topology key %s)", p.Name(), SharedTopologyKey(d.opts.DriverName, p.Name()))
	}
	return status.Errorf(codes.ResourceExhausted, "pool %s lives on node %s, which the requisite topology excludes", p.Name(), p.Node())
}

func (d *core) csiVolume(p *pool.Pool, v pool.Volume) *csi.Volume {
	ctx := map[string]string{ParamPool: p.Name(), ParamProvisioning: string(v.Provisioning)}
	if v.Encryption != nil {
		ctx[ParamEncryption] = v.Encryption.Mode
	}
	cv := &csi.Volume{
		VolumeId:           v.ID,
		CapacityBytes:      v.CapacityBytes,
		VolumeContext:      ctx,
		AccessibleTopology: []*csi.Topology{{Segments: d.poolSegments(p)}},
	}
	if src := v.Source; src != nil {
		if src.Kind == pool.SourceSnapshot {
			cv.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: src.ID}}}
		} else {
			cv.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.ID}}}
		}
	}
	return cv
}

// DeleteVolume deletes a volume; deleting a volume that does not exist
// succeeds. A volume that is attached or staged is refused.
func (d *Controller) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	vid, err := volid.ParseKind(id, volid.KindVolume)
	if err != nil {
		klog.V(2).InfoS("Deleting a malformed volume ID: nothing to do", "volumeID", id, "err", err)
		return &csi.DeleteVolumeResponse{}, nil
	}
	p, vid, err := d.pools.resolve(vid.String(), volid.KindVolume)
	if err != nil {
		// The ID names a pool or node this process does not serve: saying
		// OK would let the CO forget a volume that still exists.
		return nil, preconditionf("volume %s belongs to pool %s on node %s, which this controller does not serve", id, vid.Pool, vid.Node)
	}
	v, found, unlock, err := d.lockedVolume(p, id, vid.Token)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !found {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if len(v.Attachments) > 0 {
		return nil, preconditionf("volume %s is attached to node %s: ControllerUnpublishVolume it first", id, v.Attachments[0].Node)
	}
	if err := d.checkNotInUse(p, v); err != nil {
		return nil, err
	}
	if err := p.DeleteVolume(vid.Token); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// checkNotInUse refuses to delete an image that a loop device on this node
// still uses: the loop device would keep the deleted inode alive.
func (d *Controller) checkNotInUse(p *pool.Pool, v pool.Volume) error {
	if d.local == nil {
		return nil
	}
	dev, err := d.local.ownDevice(p, v.Token())
	if errors.Is(err, pool.ErrUntrusted) {
		// Not an image Spool made: nothing of this node uses it by
		// identity, and deleting the volume removes it without following
		// it anywhere.
		klog.ErrorS(err, "Deleting a volume whose image is not what Spool makes", "volumeID", v.ID)
		return nil
	}
	if err != nil {
		return err
	}
	if dev != nil {
		return preconditionf("volume %s is still staged on this node (%s): NodeUnstageVolume it first", v.ID, dev.Path)
	}
	return nil
}

// lockedVolume takes the lock of volume id and reads it from its pool p;
// found is false when the volume does not exist (an idempotent call then
// succeeds). The caller calls unlock when err is nil.
func (d *Controller) lockedVolume(p *pool.Pool, id, token string) (v pool.Volume, found bool, unlock func(), err error) {
	unlock, err = d.lockVolume(id)
	if err != nil {
		return pool.Volume{}, false, nil, err
	}
	v, err = p.Get(token)
	if isNotFound(err) {
		return pool.Volume{}, false, unlock, nil
	}
	if err != nil {
		unlock()
		return pool.Volume{}, false, nil, err
	}
	return v, true, unlock, nil
}

// ControllerPublishVolume attaches a volume to a node: it records the node in
// the volume's metadata and returns the publish context NodeStage verifies.
func (d *Controller) ControllerPublishVolume(_ context.Context, req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	if node == "" {
		return nil, invalidf("node ID is missing")
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if d.attachOnly() {
		return d.publishNodeLocal(req)
	}
	p, vid, err := d.pools.resolve(id, volid.KindVolume)
	if err != nil {
		return nil, err
	}
	if !p.Shared() && node != vid.Node {
		return nil, notFoundf("node %q not found: volume %s lives in a local pool of node %s", node, id, vid.Node)
	}
	if p.Shared() && !p.NodeRegistered(node) {
		return nil, notFoundf("node %q not found in shared pool %s: no spool node plugin with --pool %s=DIR,shared has registered from it (is the share mounted there?)", node, p.Name(), p.Name())
	}
	if err := checkModeForPool(p, req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()

	// The attach limit is checked before and after the attachment, with no
	// process-wide lock held across the pool's (possibly shared) storage:
	// an attach that finds the node over its limit afterwards takes its
	// own attachment back. Racing attaches at the limit may both be
	// refused; the CO retries them.
	max := d.opts.MaxVolumesPerNode
	if max > 0 {
		if v, err := p.Get(vid.Token); err != nil {
			return nil, err
		} else if _, ok := v.AttachmentFor(node); !ok {
			if n := d.pools.attachedTo(node); n >= max {
				return nil, status.Errorf(codes.ResourceExhausted, "node %s already has %d volumes attached, its limit", node, n)
			}
		}
	}
	created := false
	mode := req.GetVolumeCapability().GetAccessMode().GetMode().String()
	// Readers of a volume many nodes attach never write to it.
	ro := req.GetReadonly() || mode == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY.String()
	// Decided on the metadata as Update reads it: in a shared pool, under
	// the volume's lock file, so that two controllers cannot both attach.
	var att pool.Attachment
	_, err = p.Update(vid.Token, func(v *pool.Volume) error {
		if a, ok := v.AttachmentFor(node); ok {
			if a.ReadOnly != ro || a.AccessMode != mode {
				return alreadyExistsf("volume %s is already attached to node %s with readonly=%t, mode %s", id, node, a.ReadOnly, a.AccessMode)
			}
			att = a
			return pool.ErrUnchanged
		}
		if err := canJoin(v, node, mode); err != nil {
			return err
		}
		v.Generation++
		att = pool.Attachment{Node: node, ReadOnly: ro, AccessMode: mode, Generation: v.Generation}
		v.Attachments = append(v.Attachments, att)
		created = true
		return nil
	})
	if err != nil {
		return nil, err
	}
	if created && max > 0 {
		if n := d.pools.attachedTo(node); n > max {
			if _, err := p.Update(vid.Token, func(v *pool.Volume) error {
				v.Attachments = slices.DeleteFunc(v.Attachments, func(a pool.Attachment) bool { return a.Node == node && a.Generation == att.Generation })
				return nil
			}); err != nil {
				return nil, fmt.Errorf("taking back an attachment beyond node %s's limit: %w", node, err)
			}
			return nil, status.Errorf(codes.ResourceExhausted, "node %s already has %d volumes attached, its limit", node, n-1)
		}
	}
	klog.V(2).InfoS("Attached volume", "volumeID", id, "node", node, "readonly", att.ReadOnly, "mode", mode, "generation", att.Generation)
	return &csi.ControllerPublishVolumeResponse{PublishContext: sharedPublishContext(p, publishContext(att))}, nil
}

func publishContext(a pool.Attachment) map[string]string {
	return map[string]string{
		ctxNode:       a.Node,
		ctxGeneration: strconv.FormatUint(a.Generation, 10),
		ctxReadOnly:   strconv.FormatBool(a.ReadOnly),
	}
}

// ControllerUnpublishVolume removes the node's attach record. Volumes and
// nodes that do not exist are already unpublished.
func (d *Controller) ControllerUnpublishVolume(_ context.Context, req *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	p, vid, err := d.pools.resolve(id, volid.KindVolume)
	if err != nil {
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	}
	v, found, unlock, err := d.lockedVolume(p, id, vid.Token)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !found {
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	}
	detach := func(a pool.Attachment) bool { return node == "" || a.Node == node }
	if !slices.ContainsFunc(v.Attachments, detach) {
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	}
	if _, err := p.Update(vid.Token, func(v *pool.Volume) error {
		v.Attachments = slices.DeleteFunc(v.Attachments, detach)
		return nil
	}); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Detached volume", "volumeID", id, "node", node)
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities Spool supports for an
// existing volume.
func (d *Controller) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, invalidf("volume capabilities are missing")
	}
	p, v, err := d.pools.volume(id)
	if err != nil {
		return nil, err
	}
	for _, c := range req.GetVolumeCapabilities() {
		if err := checkCapability(c); err != nil {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
		}
		if err := checkModeForPool(p, c); err != nil {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
		}
		if t, fsType := accessTypeOf(c); t != v.AccessType || (fsType != "" && v.FSType != "" && fsType != v.FSType) {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: "volume " + id + " was created for " + string(v.AccessType) + " access " + v.FSType}, nil
		}
	}
	prm, err := parseParams(req.GetParameters())
	if err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if prm.encryption != "" && v.Encryption == nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: "volume " + id + " is not encrypted"}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// ListVolumes lists the volumes of all pools in ID order. The token is the
// ID to resume from, so deleting or adding volumes between pages neither
// skips nor repeats the others.
func (d *Controller) ListVolumes(_ context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	page, next, err := d.pools.volumePage(req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, e := range page {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{
			Volume: d.csiVolume(e.p, e.v),
			Status: &csi.ListVolumesResponse_VolumeStatus{PublishedNodeIds: publishedNodes(e.v)},
		})
	}
	return resp, nil
}

// publishedNodes lists the nodes a volume is attached to.
func publishedNodes(v pool.Volume) []string {
	var out []string
	for _, a := range v.Attachments {
		out = append(out, a.Node)
	}
	return out
}

// GetCapacity reports what a new volume may still provision in a pool, for
// the pool's node only.
func (d *Controller) GetCapacity(_ context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	prm, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	p, ok := d.pools.get(prm.pool)
	if !ok {
		return nil, invalidf("pool %q is not served here (pools: %v)", prm.pool, d.pools.names())
	}
	minSize := sizeGranularity
	for _, c := range req.GetVolumeCapabilities() {
		if checkCapability(c) != nil || checkModeForPool(p, c) != nil {
			return &csi.GetCapacityResponse{}, nil
		}
		_, fsType := accessTypeOf(c)
		minSize = max(minSize, fs.MinSize(fsType))
	}
	if t := req.GetAccessibleTopology(); t != nil && !d.topologyMatches(p, t) {
		return &csi.GetCapacityResponse{}, nil
	}
	c, err := p.Capacity()
	if err != nil {
		return nil, err
	}
	avail := c.Available - c.Available%size.MiB
	return &csi.GetCapacityResponse{
		AvailableCapacity: avail,
		MaximumVolumeSize: wrapperspb.Int64(avail),
		MinimumVolumeSize: wrapperspb.Int64(minSize),
	}, nil
}

// ControllerGetVolume returns a volume and the nodes it is attached to.
func (d *Controller) ControllerGetVolume(_ context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, invalidf("volume ID is missing")
	}
	p, v, err := d.pools.volume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeResponse{
		Volume: d.csiVolume(p, v),
		Status: &csi.ControllerGetVolumeResponse_VolumeStatus{PublishedNodeIds: publishedNodes(v)},
	}, nil
}

// ControllerModifyVolume changes a volume's mutable parameters: only
// provisioning (thin or thick).
func (d *Controller) ControllerModifyVolume(_ context.Context, req *csi.ControllerModifyVolumeRequest) (*csi.ControllerModifyVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	prm := params{}
	if err := applyMutableParams(&prm, req.GetMutableParameters()); err != nil {
		return nil, err
	}
	p, vid, unlock, err := d.lockResolved(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if prm.provisioning == "" {
		_, err := p.Get(vid.Token)
		return &csi.ControllerModifyVolumeResponse{}, err
	}
	if _, err := p.SetProvisioning(vid.Token, prm.provisioning); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Modified volume", "volumeID", id, "provisioning", prm.provisioning)
	return &csi.ControllerModifyVolumeResponse{}, nil
}
