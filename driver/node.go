package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/fscrypt"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
)

// blockMarker is the file inside a block volume's staging directory onto
// which NodeStage binds the loop device node: it marks the volume staged
// (also across restarts of the plugin) and names its device.
const blockMarker = "device"

// NodeGetCapabilities lists the node RPCs Spool implements.
func (d *Node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.NodeServiceCapability{
			Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}},
		})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo reports the node ID, its attach limit and its topology.
func (d *Node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.opts.NodeID,
		MaxVolumesPerNode:  d.opts.MaxVolumesPerNode,
		AccessibleTopology: &csi.Topology{Segments: d.nodeSegments()},
	}, nil
}

// nodeVolume is what every node call works on: the volume, the identity of
// its image and the loop device of this node backed by that image (nil when
// none). An image that is missing, or is not what Spool makes (a link, a
// hard link, a device), has no identity: imageErr says why, and the volume
// is neither attached nor matched to a device.
type nodeVolume struct {
	pool     *pool.Pool
	vol      pool.Volume
	image    pool.ImageID
	imageErr error
	dev      *loop.Device
}

// nodeLookup finds a volume served by this node and its loop device.
func (d *Node) nodeLookup(id string) (*nodeVolume, error) {
	p, v, err := d.findNodeVolume(id)
	if err != nil {
		return nil, err
	}
	nv := &nodeVolume{pool: p, vol: v}
	if nv.image, nv.imageErr = imageOf(p, v.Token()); nv.imageErr != nil {
		return nv, nil
	}
	if nv.dev, err = d.findDevice(nv.image); err != nil {
		return nil, fmt.Errorf("looking up the loop device of %s: %w", id, err)
	}
	return nv, nil
}

// imageOf identifies the image of a volume, opened beneath the pool root.
func imageOf(p *pool.Pool, token string) (pool.ImageID, error) {
	f, err := p.OpenImage(token, unix.O_PATH)
	if err != nil {
		return pool.ImageID{}, err
	}
	defer f.Close()
	return pool.ImageIDOf(f)
}

// findDevice returns this node's loop device backed by the image, or nil.
func (d *Node) findDevice(image pool.ImageID) (*loop.Device, error) {
	dev, err := d.kernel.Loops.Find(image, d.loopOwner)
	if errors.Is(err, loop.ErrNotFound) {
		return nil, nil
	}
	return dev, err
}

// ownDevice returns this node's loop device of a volume, or nil when the
// volume has none or its image is gone. An image that is not what Spool
// makes is an error wrapping pool.ErrUntrusted.
func (d *Node) ownDevice(p *pool.Pool, token string) (*loop.Device, error) {
	image, err := imageOf(p, token)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return d.findDevice(image)
}

// attach attaches the volume's image to a new loop device of this node. The
// image is opened beneath the pool root and checked again, and the loop
// device is set up from that descriptor: what was checked is what the
// kernel gets.
func (d *Node) attach(nv *nodeVolume, ro bool) (*loop.Device, error) {
	if nv.imageErr != nil {
		return nil, imageError(nv.vol.ID, nv.imageErr)
	}
	mode := unix.O_RDWR
	if ro {
		mode = unix.O_RDONLY
	}
	f, err := nv.pool.OpenImage(nv.vol.Token(), mode)
	if err != nil {
		return nil, imageError(nv.vol.ID, err)
	}
	defer f.Close()
	if id, err := pool.ImageIDOf(f); err != nil || id != nv.image {
		return nil, status.Errorf(codes.Aborted, "the image of volume %s was replaced while it was being attached; retry", nv.vol.ID)
	}
	dev, err := d.kernel.Loops.Attach(f, loop.Options{ReadOnly: ro, DirectIO: true, Owner: d.loopOwner, Label: nv.vol.Token()})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "attaching %s: %v", nv.vol.ID, err)
	}
	return dev, nil
}

// imageError says which volume's image could not be opened; toStatus gives
// it its code (an image that is not what Spool makes: FailedPrecondition).
func imageError(id string, err error) error {
	return fmt.Errorf("volume %s: opening its image: %w", id, err)
}

// lockNodeVolume takes the volume's lock and finds it on this node; the
// caller calls unlock when it is done.
func (d *Node) lockNodeVolume(id string) (*nodeVolume, func(), error) {
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, nil, err
	}
	nv, err := d.nodeLookup(id)
	if err != nil {
		unlock()
		return nil, nil, err
	}
	return nv, unlock, nil
}

// findNodeVolume finds a volume by its Spool ID, or an ephemeral inline
// volume by the ID the kubelet gave it.
func (d *Node) findNodeVolume(id string) (*pool.Pool, pool.Volume, error) {
	p, v, err := d.pools.volume(id)
	if err != nil && isEphemeralID(id) {
		if p, v, ok := d.pools.volumeNamed(ephemeralName(id)); ok {
			return p, v, nil
		}
	}
	return p, v, err
}

// checkPublishContext verifies that the volume is attached to this node with
// the attachment the publish context names, and returns whether that
// attachment is read-only.
func (d *Node) checkPublishContext(v pool.Volume, pc map[string]string) (bool, error) {
	node := pc[ctxNode]
	if node == "" {
		return false, preconditionf("volume %s has no publish context: ControllerPublishVolume must attach it to node %s first", v.ID, d.opts.NodeID)
	}
	if node != d.opts.NodeID {
		return false, preconditionf("volume %s was published to node %s, not to this node %s", v.ID, node, d.opts.NodeID)
	}
	a, ok := v.AttachmentFor(node)
	if !ok {
		return false, preconditionf("volume %s is not attached to node %s", v.ID, node)
	}
	if pc[ctxAttachedBy] == "node" {
		// Published by an attach controller without the pool; NodeStage
		// recorded the attachment (attachonly.go).
		if !a.ByNode {
			return false, preconditionf("volume %s is attached to node %s by a controller, but the publish context says node-local attach", v.ID, node)
		}
		return a.ReadOnly, nil
	}
	if gen := pc[ctxGeneration]; gen != strconv.FormatUint(a.Generation, 10) {
		return false, preconditionf("publish context of volume %s is stale: attachment generation %q, current %d", v.ID, gen, a.Generation)
	}
	return a.ReadOnly, nil
}

func readOnlyMode(c *csi.VolumeCapability) bool {
	m := c.GetAccessMode().GetMode()
	return m == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY || m == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
}

// stage is one NodeStageVolume as it goes through its steps, admit →
// attach → mount → record; each step passes on what it learned.
type stage struct {
	nv      *nodeVolume
	staging string
	c       *csi.VolumeCapability
	pc      map[string]string
	block   bool
	fsType  string // the filesystem the volume is staged with
	ro      bool   // the attachment or the access mode is read-only
	mounts  []fs.MountInfo
	// found is the filesystem the device holds, as probed before mounting
	// ("" when it was blank and got formatted).
	found string
	// attached: this call attached the loop device (a failure detaches it).
	attached bool
	// newFSID: a copy's filesystem got its own UUID, for record to write.
	newFSID bool
	// key is an encrypted volume's key (encryption.go), nil otherwise.
	key fscrypt.Key
}

// NodeStageVolume attaches the image to a loop device and, for filesystem
// volumes, formats a blank device and mounts it at the staging path. Block
// volumes get their device node bound onto <staging>/device.
func (d *Node) NodeStageVolume(_ context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id := req.GetVolumeId()
	staging, err := checkNodeCall(id, "staging target path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	c := req.GetVolumeCapability()
	if err := checkCapability(c); err != nil {
		return nil, err
	}
	nv, unlock, err := d.lockNodeVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st := &stage{nv: nv, staging: staging, c: c, pc: req.GetPublishContext()}
	// An encrypted volume's key is checked before anything changes.
	if st.key, err = stageKey(nv.vol, req.GetSecrets()); err != nil {
		return nil, err
	}
	defer st.key.Wipe()
	done, err := d.admit(st)
	if err != nil {
		return nil, err
	}
	if done {
		// Already staged (by a plugin that restarted, perhaps): the key
		// must still be this volume's.
		if err := d.unlock(st); err != nil {
			return nil, err
		}
	} else {
		if err := d.attachForStage(st); err != nil {
			return nil, err
		}
		if err := d.mountForStage(st); err != nil {
			if st.attached {
				if derr := d.kernel.Loops.Detach(nv.dev.Path); derr != nil {
					klog.ErrorS(derr, "Could not detach loop device after a failed stage", "volumeID", id, "device", nv.dev.Path)
				}
			}
			return nil, err
		}
		faults.Point("stage-mounted")
		klog.V(2).InfoS("Staged volume", "volumeID", id, "device", nv.dev.Path, "stagingPath", staging, "block", st.block)
	}
	d.record(st)
	return &csi.NodeStageVolumeResponse{}, nil
}

// admit decides whether the volume may be staged here, as asked: the
// publish context against the pool's record (and, in a shared pool, marks
// the attachment staged in the same locked step), the capability against
// how the volume was made, and what the staging path holds. done reports a
// volume already staged there as asked.
func (d *Node) admit(st *stage) (done bool, err error) {
	nv, pc, c, id := st.nv, st.pc, st.c, st.nv.vol.ID
	if err := checkModeForPool(nv.pool, c); err != nil {
		return false, err
	}
	var attachedRO bool
	switch {
	case pc[ctxAttachedBy] == "node" && nv.pool.Shared():
		// Only a controller with the pool attaches a shared volume.
		err = preconditionf("volume %s is in shared pool %s: its publish context must come from a controller that serves the pool, not from an attach controller without pools", id, nv.pool.Name())
	case pc[ctxAttachedBy] == "node" && pc[ctxNode] == d.opts.NodeID:
		attachedRO, err = d.recordNodeAttachment(nv, pc)
	default:
		attachedRO, err = d.checkPublishContext(nv.vol, pc)
	}
	if err == nil && nv.pool.Shared() {
		err = checkSharedStage(nv.pool, nv.vol, pc)
		if err == nil {
			gen, _ := generationOf(pc) // checkPublishContext parsed it
			err = d.markStaged(nv.pool, nv.vol, gen)
		}
		if err == nil {
			faults.Point("stage-marked")
		}
	}
	if err != nil {
		return false, err
	}
	st.ro = attachedRO || readOnlyMode(c)
	st.block = c.GetBlock() != nil
	st.fsType = fsTypeOrDefault(c.GetMount().GetFsType())
	if c.GetMount().GetFsType() == "" && nv.vol.FSType != "" {
		st.fsType = nv.vol.FSType
	}
	if err := checkStageKind(nv.vol, st.block, st.fsType); err != nil {
		return false, err
	}
	if st.mounts, err = d.kernel.Mounter.Mounts(); err != nil {
		return false, err
	}
	return d.alreadyStaged(nv, st.mounts, st.staging, st.block, st.fsType)
}

// attachForStage makes the staging path and gives the volume a loop device
// with the flags the stage needs.
func (d *Node) attachForStage(st *stage) error {
	nv := st.nv
	// A leftover block marker of an interrupted stage may remain; stageBlock
	// checks that it is an empty file.
	var allow []string
	if st.block {
		allow = []string{blockMarker}
	}
	if err := fs.MakeDir(st.staging, allow...); err != nil {
		return coPathError("staging path", err)
	}
	if nv.dev != nil && nv.dev.ReadOnly != st.ro {
		if users := deviceUsers(st.mounts, nv.dev); len(users) > 0 {
			return preconditionf("volume %s is in use at %v with readonly=%t", nv.vol.ID, users, nv.dev.ReadOnly)
		}
		// A leftover of an interrupted stage with other flags.
		if err := d.kernel.Loops.Detach(nv.dev.Path); err != nil {
			return err
		}
		nv.dev = nil
	}
	if nv.dev != nil {
		return nil
	}
	dev, err := d.attach(nv, st.ro)
	if err != nil {
		return err
	}
	nv.dev, st.attached = dev, true
	klog.V(2).InfoS("Attached loop device", "volumeID", nv.vol.ID, "device", dev.Path, "directIO", dev.DirectIO, "readonly", st.ro)
	faults.Point("stage-attached")
	return nil
}

// mountForStage binds a block volume's device node at the staging marker,
// or formats (when blank) and mounts a filesystem volume there.
func (d *Node) mountForStage(st *stage) error {
	if st.block {
		return d.stageBlock(st.nv, st.staging)
	}
	if err := d.stageMount(st); err != nil {
		return err
	}
	if err := d.unlock(st); err != nil {
		// Nothing stays mounted with a key that does not unlock it.
		if uerr := d.kernel.Mounter.Unmount(st.staging); uerr != nil {
			klog.ErrorS(uerr, "Could not unmount after a failed unlock", "volumeID", st.nv.vol.ID)
		}
		return err
	}
	return nil
}

// record keeps what the stage established: the attachment the node now
// watches (a shared pool's fence) and, in the pool, that a copy's
// filesystem got its own UUID. It runs after the mount, so no pool write
// sits between attaching and mounting.
func (d *Node) record(st *stage) {
	nv := st.nv
	if g, ok := generationOf(st.pc); ok && nv.pool.Shared() {
		d.fences.set(nv.vol.ID, g)
	}
	if st.newFSID {
		if err := nv.pool.ClearNewFilesystemID(nv.vol.Token()); err != nil {
			// The next stage gives it a new UUID again: harmless.
			klog.ErrorS(err, "Could not record the new filesystem UUID", "volumeID", nv.vol.ID)
		}
	}
}

// checkStageKind refuses to stage a volume otherwise than it was made: the
// bytes of a block volume reach the host's kernel and mkfs only as a raw
// device, and a filesystem volume is mounted only as its own filesystem.
// FailedPrecondition, as the CSI spec says for capabilities the volume does
// not support. A record without an access type passes.
func checkStageKind(v pool.Volume, block bool, fsType string) error {
	asked := pool.Mount
	if block {
		asked = pool.Block
	}
	switch {
	case v.AccessType == "":
		return nil
	case v.AccessType != asked:
		return preconditionf("volume %s was made for %s access and cannot be staged for %s access", v.ID, v.AccessType, asked)
	case asked == pool.Mount && fsTypeOrDefault(v.FSType) != fsType:
		return preconditionf("volume %s was made with a %s filesystem and cannot be staged as %s", v.ID, fsTypeOrDefault(v.FSType), fsType)
	}
	return nil
}

// alreadyStaged reports whether the volume is already staged at staging as
// asked. A staging path that holds anything else is an error.
func (d *Node) alreadyStaged(nv *nodeVolume, mounts []fs.MountInfo, staging string, block bool, fsType string) (bool, error) {
	if block {
		m, ok := fs.MountAt(mounts, filepath.Join(staging, blockMarker))
		if !ok {
			if _, ok := fs.MountAt(mounts, staging); ok {
				return false, alreadyExistsf("staging path %s holds a filesystem mount; volume %s was asked for block access", staging, nv.vol.ID)
			}
			return false, nil
		}
		if nv.dev != nil && fs.IsDeviceNodeBind(m, nv.dev.Path) {
			return true, nil
		}
		return false, preconditionf("staging path %s already holds another device", staging)
	}
	m, ok := fs.MountAt(mounts, staging)
	if !ok {
		if _, ok := fs.MountAt(mounts, filepath.Join(staging, blockMarker)); ok {
			return false, alreadyExistsf("volume %s is staged for block access at %s", nv.vol.ID, staging)
		}
		return false, nil
	}
	if nv.dev == nil || !fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev) {
		return false, preconditionf("staging path %s already holds another mount (%s)", staging, m.Source)
	}
	if m.FsType != fsType {
		return false, alreadyExistsf("volume %s is staged with filesystem %s, not %s", nv.vol.ID, m.FsType, fsType)
	}
	return true, nil
}

func (d *Node) stageBlock(nv *nodeVolume, staging string) error {
	marker := filepath.Join(staging, blockMarker)
	if err := fs.MakeFile(marker); err != nil {
		return coPathError("staging path", err)
	}
	if err := d.kernel.Mounter.BindMount(nv.dev.Path, marker, nv.dev.ReadOnly); err != nil {
		if rerr := fs.RemoveEmpty(marker); rerr != nil {
			klog.ErrorS(rerr, "Could not remove the block marker after a failed stage", "volumeID", nv.vol.ID)
		}
		return status.Errorf(codes.Internal, "staging %s: %v", nv.vol.ID, err)
	}
	return nil
}

func (d *Node) stageMount(st *stage) error {
	nv, c, staging, fsType, ro := st.nv, st.c, st.staging, st.fsType, st.ro
	found, err := d.kernel.Mounter.Probe(nv.dev.Path)
	if err != nil {
		return status.Errorf(codes.Internal, "%v", err)
	}
	if found != "" && found != fsType {
		return preconditionf("volume %s holds a %s filesystem; refusing to mount it as %s", nv.vol.ID, found, fsType)
	}
	if found == "" && ro {
		return preconditionf("volume %s is blank and attached read-only: it cannot be formatted", nv.vol.ID)
	}
	// A tenant's files are never devices or setuid programs on the host
	// (the pods' bind mounts inherit both flags).
	opts := append([]string{"nosuid", "nodev"}, c.GetMount().GetMountFlags()...)
	if ro {
		// The loop device is read-only too: a journal left dirty by the
		// last writer (a node that died) is not replayed, or the mount
		// would fail trying to write.
		opts = append(opts, "ro")
		opts = append(opts, fs.NoReplayOptions(found)...)
	}
	st.found = found
	if found != "" && nv.vol.Source != nil {
		var copyOpts []string
		copyOpts, st.newFSID = d.copyIdentity(nv, found, ro)
		opts = append(opts, copyOpts...)
	}
	// The image may have grown while the volume was not staged (or be a
	// copy made larger than its origin): ext4 grows before its mount,
	// xfs and btrfs after.
	if found != "" && !ro {
		if grown, err := d.kernel.Mounter.GrowUnmounted(nv.dev.Path, found); err != nil {
			return status.Errorf(codes.Internal, "staging %s: %v", nv.vol.ID, err)
		} else if grown {
			klog.V(2).InfoS("Grew filesystem before mounting it", "volumeID", nv.vol.ID, "fsType", found)
		}
	}
	if found == "" {
		var formatOpts []string
		if nv.vol.Encryption != nil {
			formatOpts = []string{"-O", "encrypt"}
		}
		err = d.kernel.Mounter.FormatAndMount(nv.dev.Path, staging, fsType, opts, formatOpts)
	} else {
		err = d.kernel.Mounter.MountFormatted(nv.dev.Path, staging, found, opts)
	}
	if err != nil {
		return status.Errorf(codes.Internal, "staging %s: %v", nv.vol.ID, err)
	}
	if found == "" || found == "ext4" || ro {
		return nil
	}
	if err := d.growFilesystem(nv, staging, found); err != nil {
		if uerr := d.kernel.Mounter.Unmount(staging); uerr != nil {
			klog.ErrorS(uerr, "Could not unmount after a failed stage", "volumeID", nv.vol.ID)
		}
		return err
	}
	return nil
}

// copyIdentity prepares the filesystem of a snapshot restore or a clone to
// be mounted on the same node as its origin, whose UUID it still carries,
// and returns the mount options that needs. ext4 and btrfs get a new UUID
// before their first mount (btrfs refuses two filesystems with one fsid);
// xfs is always mounted with nouuid, and gets a new UUID too when its log is
// clean enough for xfs_admin. newFSID reports a new UUID, which record
// writes to the pool once the volume is mounted.
func (d *Node) copyIdentity(nv *nodeVolume, fsType string, ro bool) (opts []string, newFSID bool) {
	if fsType == "xfs" {
		opts = append(opts, "nouuid")
	}
	if !nv.vol.NewFilesystemID || ro {
		return opts, false
	}
	if err := d.kernel.Mounter.NewUUID(nv.dev.Path, fsType); errors.Is(err, fs.ErrXFSDirtyLog) {
		// Copies of a mounted xfs carry its log; nouuid covers them.
		klog.V(2).InfoS("Copied xfs filesystem keeps its origin's UUID and mounts with nouuid", "volumeID", nv.vol.ID)
		return opts, false
	} else if err != nil {
		klog.ErrorS(err, "Could not give a copied filesystem a new UUID", "volumeID", nv.vol.ID, "fsType", fsType)
		return opts, false
	}
	klog.V(2).InfoS("Gave copied filesystem a new UUID", "volumeID", nv.vol.ID, "fsType", fsType)
	return opts, true
}

// ofDevice reports whether the mount m is the loop device dev's: a
// filesystem mounted from it or a bind of its device node. Nothing is the
// mount of no device (nil): it cannot be proven.
func ofDevice(m fs.MountInfo, dev *loop.Device) bool {
	return dev != nil && (fs.IsDeviceMount(m, dev.Path, dev.Rdev) || fs.IsDeviceNodeBind(m, dev.Path))
}

// deviceUsers lists the mount points that use the loop device: filesystem
// mounts of it and binds of its device node.
func deviceUsers(mounts []fs.MountInfo, dev *loop.Device) []string {
	var out []string
	for _, m := range mounts {
		if ofDevice(m, dev) {
			out = append(out, m.MountPoint)
		}
	}
	return out
}

// NodeUnstageVolume undoes NodeStageVolume: it unmounts the staging path (or
// the block marker) and detaches the loop device. It refuses while the
// volume is still published somewhere.
func (d *Node) NodeUnstageVolume(_ context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id := req.GetVolumeId()
	staging, err := checkNodeCall(id, "staging target path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	nv, unlock, err := d.lockNodeVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	marker := filepath.Join(staging, blockMarker)
	if nv.dev == nil {
		if nv.dev, err = d.reconfiguredBlockDevice(mounts, marker, nv.vol); err != nil {
			return nil, err
		}
	}
	// Nothing is taken from under a pod: a volume still published keeps
	// its staging mount (and an encrypted one its key).
	if nv.dev != nil {
		if users := slices.DeleteFunc(deviceUsers(mounts, nv.dev), func(p string) bool { return p == staging || p == marker }); len(users) > 0 {
			return nil, preconditionf("volume %s is still published at %v: NodeUnpublishVolume it first", id, users)
		}
	}
	for _, target := range []string{marker, staging} {
		m, ok := fs.MountAt(mounts, target)
		if !ok {
			continue
		}
		if !ofDevice(m, nv.dev) {
			return nil, preconditionf("%s holds a mount that is not volume %s", target, id)
		}
		if target == staging {
			d.lock(nv.vol, staging)
		}
		if err := d.kernel.Mounter.Unmount(target); err != nil {
			return nil, status.Errorf(codes.Internal, "unstaging %s: %v", id, err)
		}
	}
	if err := fs.RemoveEmpty(marker); err != nil {
		return nil, coPathError("block marker", err)
	}
	if nv.dev != nil {
		if mounts, err = d.kernel.Mounter.Mounts(); err != nil {
			return nil, err
		}
		if users := deviceUsers(mounts, nv.dev); len(users) > 0 {
			return nil, preconditionf("volume %s is still published at %v: NodeUnpublishVolume it first", id, users)
		}
		faults.Point("unstage-unmounted")
		if err := d.kernel.Loops.Detach(nv.dev.Path); err != nil {
			return nil, status.Errorf(codes.Internal, "detaching %s from %s: %v", nv.dev.Path, id, err)
		}
		klog.V(2).InfoS("Unstaged volume", "volumeID", id, "device", nv.dev.Path, "stagingPath", staging)
	}
	if err := d.releaseNodeAttachment(nv); err != nil {
		return nil, err
	}
	d.fences.drop(id)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged volume onto the target path: the
// staging mount for filesystems, the loop device node for block volumes.
func (d *Node) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id := req.GetVolumeId()
	target, err := checkNodeCall(id, "target path", req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	c := req.GetVolumeCapability()
	if err := checkCapability(c); err != nil {
		return nil, err
	}
	if isEphemeral(req.GetVolumeContext()) {
		return d.publishEphemeral(ctx, req, target)
	}
	staging, err := checkPath("staging target path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	nv, unlock, err := d.lockNodeVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := checkModeForPool(nv.pool, c); err != nil {
		return nil, err
	}
	attachedRO, err := d.checkPublishContext(nv.vol, req.GetPublishContext())
	if err != nil {
		return nil, err
	}
	ro := req.GetReadonly() || attachedRO || readOnlyMode(c)
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	block := c.GetBlock() != nil
	if !d.isStaged(nv, mounts, staging, block) {
		return nil, preconditionf("volume %s is not staged at %s: NodeStageVolume it first", id, staging)
	}
	var source string
	if block {
		source = nv.dev.Path
		d.checkDevice(nv)
	} else if source, err = publishSource(nv.vol, staging); err != nil {
		return nil, err
	}
	if m, ok := fs.MountAt(mounts, target); ok {
		if !ofDevice(m, nv.dev) {
			return nil, alreadyExistsf("target path %s already holds another mount", target)
		}
		if mountedRO := slices.Contains(m.MountOptions, "ro"); mountedRO != ro {
			return nil, alreadyExistsf("volume %s is already published at %s with readonly=%t", id, target, mountedRO)
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		others := slices.DeleteFunc(deviceUsers(mounts, nv.dev), func(p string) bool {
			return p == staging || p == filepath.Join(staging, blockMarker)
		})
		if len(others) > 0 {
			return nil, preconditionf("volume %s has a single-writer access mode and is already published at %v", id, others)
		}
	}
	if block {
		err = fs.MakeFile(target)
	} else {
		err = fs.MakeDir(target)
	}
	if err != nil {
		return nil, coPathError("target path", err)
	}
	faults.Point("publish-target-made")
	if err := d.kernel.Mounter.BindMount(source, target, ro); err != nil {
		return nil, status.Errorf(codes.Internal, "publishing %s: %v", id, err)
	}
	klog.V(2).InfoS("Published volume", "volumeID", id, "target", target, "readonly", ro, "block", block)
	return &csi.NodePublishVolumeResponse{}, nil
}

// reconfiguredBlockDevice finds the loop device bound at a block volume's
// staging marker or publish target when the volume's image no longer leads
// to it: a pod with the raw device changed its backing file
// (LOOP_CHANGE_FD), or the image was replaced in the pool. Unpublish and
// unstage must still work. The bind is this volume's when the device
// carries this node's owner tag and the volume's token (set at attach); a
// device without them is not proven to be this volume's and stays, and the
// call fails. It returns nil when no device node is bound at marker.
func (d *Node) reconfiguredBlockDevice(mounts []fs.MountInfo, marker string, v pool.Volume) (*loop.Device, error) {
	m, ok := fs.MountAt(mounts, marker)
	if !ok || m.FsType != "devtmpfs" {
		return nil, nil
	}
	devs, err := d.kernel.Loops.List()
	if err != nil {
		return nil, err
	}
	for i := range devs {
		dev := &devs[i]
		if !fs.IsDeviceNodeBind(m, dev.Path) {
			continue
		}
		if dev.Owner != d.loopOwner || dev.Label != v.Token() {
			return nil, preconditionf("%s binds %s, which no longer backs the image of volume %s and does not carry this node's and this volume's tag: it is left as it is; unmount and detach it by hand", marker, dev.Path, v.ID)
		}
		klog.ErrorS(nil, "The loop device staged for a block volume no longer backs its image (reconfigured through its device node, or the image was replaced); unstaging it", "marker", marker, "device", dev.Path, "backingFile", dev.BackingFile)
		return dev, nil
	}
	return nil, nil
}

// coPathError says which CO-given path an error is about; toStatus gives it
// its code (a path holding what Spool did not make: FailedPrecondition, and
// it stays as it is).
func coPathError(what string, err error) error {
	return fmt.Errorf("%s: %w", what, err)
}

// isStaged reports whether the volume's loop device is staged at staging.
func (d *Node) isStaged(nv *nodeVolume, mounts []fs.MountInfo, staging string, block bool) bool {
	if nv.dev == nil {
		return false
	}
	if block {
		m, ok := fs.MountAt(mounts, filepath.Join(staging, blockMarker))
		return ok && fs.IsDeviceNodeBind(m, nv.dev.Path)
	}
	m, ok := fs.MountAt(mounts, staging)
	return ok && fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev)
}

// NodeUnpublishVolume unmounts the target path and removes it.
func (d *Node) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id := req.GetVolumeId()
	target, err := checkNodeCall(id, "target path", req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	nv, err := d.nodeLookup(id)
	if err != nil && isEphemeralID(id) {
		// An ephemeral volume that is already gone (deleted by an earlier
		// unpublish, or at start): only the target may remain.
		return &csi.NodeUnpublishVolumeResponse{}, d.removeUnmountedTarget(id, target)
	}
	if err != nil {
		return nil, err
	}
	// Publishing is idempotent, so there is one mount at most; the bound
	// guards against a target that something else keeps mounting on.
	for range 4 {
		mounts, err := d.kernel.Mounter.Mounts()
		if err != nil {
			return nil, err
		}
		m, ok := fs.MountAt(mounts, target)
		if !ok {
			break
		}
		if nv.dev == nil {
			if nv.dev, err = d.reconfiguredBlockDevice(mounts, target, nv.vol); err != nil {
				return nil, err
			}
		}
		// Only a mount proven to be this volume's is unmounted: with no loop
		// device there is nothing to prove it by.
		if !ofDevice(m, nv.dev) {
			return nil, preconditionf("target path %s holds a mount that is not volume %s; Spool unmounts only its own", target, id)
		}
		if err := d.kernel.Mounter.Unmount(target); err != nil {
			return nil, status.Errorf(codes.Internal, "unpublishing %s: %v", id, err)
		}
	}
	if err := fs.RemoveEmpty(target); err != nil {
		return nil, coPathError("target path", err)
	}
	klog.V(2).InfoS("Unpublished volume", "volumeID", id, "target", target)
	if nv.vol.Ephemeral {
		if err := d.deleteEphemeral(nv); err != nil {
			return nil, err
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports usage: bytes and inodes of the filesystem, or
// the size of a block device. Health is NodeGetVolumeHealth's job.
func (d *Node) NodeGetVolumeStats(_ context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	path, err := checkVolumePath(id, req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	nv, err := d.nodeLookup(id)
	if err != nil {
		return nil, err
	}
	d.checkFence(nv)
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	m, ok := fs.MountAt(mounts, path)
	switch {
	case !ok || nv.dev == nil:
		return nil, notFoundf("volume %s is not published at %s", id, path)
	case fs.IsDeviceNodeBind(m, nv.dev.Path):
		d.checkDevice(nv)
		n, err := d.kernel.Loops.Size(nv.dev.Path)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: n}}}, nil
	case fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev):
		st, err := d.kernel.Mounter.Stats(path)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		usage := []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: st.TotalBytes, Available: st.AvailableBytes, Used: st.UsedBytes}}
		// btrfs allocates inodes dynamically and reports none: say nothing
		// rather than "0 of 0".
		if st.TotalInodes > 0 {
			usage = append(usage, &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES, Total: st.TotalInodes, Available: st.FreeInodes, Used: st.UsedInodes})
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: usage}, nil
	}
	return nil, notFoundf("volume %s is not published at %s (it holds another mount)", id, path)
}
