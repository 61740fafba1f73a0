package driver

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/metrics"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

// CSI ephemeral inline volumes: the kubelet calls NodePublishVolume with
// this volume context key set and a volume ID of its own making; the
// volume lives exactly as long as that publish.
const (
	ephemeralKey = "csi.storage.k8s.io/ephemeral"
	// AttrSize is the size of an ephemeral volume (default 1Gi).
	AttrSize = "size"
	// AttrFSType is the filesystem of an ephemeral volume (default ext4).
	AttrFSType = "fsType"
)

var ephemeralIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func isEphemeral(volumeContext map[string]string) bool {
	return volumeContext[ephemeralKey] == "true"
}

// isEphemeralID reports whether id can be an ephemeral volume's ID: not a
// Spool ID, and harmless as a name.
func isEphemeralID(id string) bool {
	_, err := volid.Parse(id)
	return err != nil && ephemeralIDRE.MatchString(id)
}

// ephemeralName is the pool volume name of an ephemeral volume.
func ephemeralName(id string) string { return "ephemeral/" + id }

// ephemeralAttrs are an inline volume's attributes.
type ephemeralAttrs struct {
	params
	size   int64
	fsType string
}

func parseEphemeralAttrs(in map[string]string, c *csi.VolumeCapability) (ephemeralAttrs, error) {
	a := ephemeralAttrs{size: DefaultVolumeSize, fsType: c.GetMount().GetFsType()}
	rest := map[string]string{}
	for k, v := range in {
		switch k {
		case AttrSize:
			n, err := size.Parse(v)
			if err != nil || n == 0 {
				return a, invalidf("volume attribute %s=%q: want a size such as 1Gi", AttrSize, v)
			}
			a.size = n
		case AttrFSType:
			a.fsType = v
		default:
			rest[k] = v
		}
	}
	if a.fsType != "" && !fs.Supported(a.fsType) {
		return a, invalidf("fsType %q is not supported (supported: %s)", a.fsType, strings.Join(fs.SupportedTypes(), ", "))
	}
	var err error
	if a.params, err = parseParams(rest); err != nil {
		return a, err
	}
	if a.encryption != "" {
		return a, invalidf("volume attribute %s: ephemeral inline volumes cannot be encrypted: NodePublishVolume carries no node-stage Secret to key them; use a PersistentVolumeClaim (or a generic ephemeral volume) of an encrypted StorageClass", ParamEncryption)
	}
	return a, nil
}

// publishEphemeral creates an ephemeral volume from the volume attributes,
// attaches it and mounts it at the target. Nothing is staged: the volume has
// one user.
func (d *Node) publishEphemeral(ctx context.Context, req *csi.NodePublishVolumeRequest, target string) (*csi.NodePublishVolumeResponse, error) {
	id := req.GetVolumeId()
	if !isEphemeralID(id) {
		return nil, invalidf("ephemeral volume ID %q must be 1-128 letters, digits, '.', '_' or '-'", id)
	}
	c := req.GetVolumeCapability()
	if c.GetMount() == nil {
		return nil, invalidf("ephemeral volumes are filesystems, not block devices")
	}
	attrs, err := parseEphemeralAttrs(req.GetVolumeContext(), c)
	if err != nil {
		return nil, err
	}
	p, ok := d.pools.get(attrs.pool)
	if !ok {
		return nil, invalidf("pool %q is not served here (pools: %v)", attrs.pool, d.pools.names())
	}
	if err := d.checkEphemeralLimits(p, attrs); err != nil {
		return nil, err
	}
	if p.Shared() {
		return nil, invalidf("pool %s is shared: inline ephemeral volumes live and die with a pod on one node, so they need a local pool", p.Name())
	}
	fsType := fsTypeOrDefault(attrs.fsType)
	n, err := volumeSize(&csi.CapacityRange{RequiredBytes: attrs.size}, fsType)
	if err != nil {
		return nil, err
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, _, err := p.CreateVolume(ctx, pool.CreateRequest{
		Name: ephemeralName(id), CapacityBytes: n, Provisioning: attrs.provisioning,
		AccessType: pool.Mount, FSType: fsType, Ephemeral: true,
	})
	if err != nil {
		return nil, err
	}
	nv, err := d.nodeLookup(id)
	if err != nil {
		return nil, err
	}
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	ro := req.GetReadonly()
	if m, ok := fs.MountAt(mounts, target); ok {
		if nv.dev == nil || !fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev) {
			return nil, alreadyExistsf("target path %s already holds another mount", target)
		}
		if slices.Contains(m.MountOptions, "ro") != ro {
			return nil, alreadyExistsf("ephemeral volume %s is already published at %s with other flags", id, target)
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if nv.dev == nil {
		if nv.dev, err = d.attach(nv, false); err != nil {
			return nil, d.failEphemeral(nv, err)
		}
	}
	if err := fs.MakeDir(target); err != nil {
		return nil, d.failEphemeral(nv, coPathError("target path", err))
	}
	found, err := d.kernel.Mounter.Probe(nv.dev.Path)
	if err == nil && found != "" && found != fsType {
		err = preconditionf("ephemeral volume %s holds a %s filesystem, not %s", id, found, fsType)
	}
	if err == nil {
		// The pod's files are never devices or setuid programs on the node.
		opts := append([]string{"nosuid", "nodev"}, c.GetMount().GetMountFlags()...)
		m := d.kernel.Mounter
		switch {
		case found == "" && ro:
			// A blank device is formatted read-write, then mounted read-only.
			if err = m.FormatAndMount(nv.dev.Path, target, fsType, opts, nil); err == nil {
				if err = m.Unmount(target); err == nil {
					err = m.MountFormatted(nv.dev.Path, target, fsType, append(opts, "ro"))
				}
			}
		case found == "":
			err = m.FormatAndMount(nv.dev.Path, target, fsType, opts, nil)
		case ro:
			// A publish retried after a crash finds the filesystem made.
			err = m.MountFormatted(nv.dev.Path, target, fsType, append(opts, "ro"))
		default:
			err = m.MountFormatted(nv.dev.Path, target, fsType, opts)
		}
	}
	if err != nil {
		err = fmt.Errorf("publishing ephemeral volume %s: %w", id, err)
		return nil, d.failEphemeral(nv, err)
	}
	klog.V(2).InfoS("Published ephemeral volume", "volumeID", id, "pool", p.Name(), "spoolID", v.ID, "bytes", v.CapacityBytes, "target", target)
	return &csi.NodePublishVolumeResponse{}, nil
}

// checkEphemeralLimits applies the operator's limits to what a pod spec asks
// (see EphemeralLimits), and counts the volume toward the node's attach
// limit like any other.
func (d *Node) checkEphemeralLimits(p *pool.Pool, attrs ephemeralAttrs) error {
	lim := d.opts.Ephemeral
	if !slices.Contains(lim.Pools, p.Name()) {
		return invalidf("ephemeral volumes may use pools %v, not %s (--ephemeral-pools)", lim.Pools, p.Name())
	}
	if attrs.size > lim.MaxSize {
		return invalidf("ephemeral volume size %s is larger than this node allows (%s, --ephemeral-max-size)", size.Format(attrs.size), size.Format(lim.MaxSize))
	}
	if attrs.provisioning == pool.Thick && !lim.AllowThick {
		return invalidf("ephemeral volumes are thin on this node: provisioning: thick needs --ephemeral-allow-thick")
	}
	if max := d.opts.MaxVolumesPerNode; max > 0 {
		n, err := d.attachedLoops()
		if err != nil {
			return status.Errorf(codes.Internal, "counting this node's volumes: %v", err)
		}
		if int64(n) >= max {
			return status.Errorf(codes.ResourceExhausted, "node %s already has %d volumes attached, its limit (--max-volumes-per-node)", d.opts.NodeID, n)
		}
	}
	return nil
}

// failEphemeral undoes a half-made ephemeral publish and returns err.
func (d *Node) failEphemeral(nv *nodeVolume, err error) error {
	if derr := d.deleteEphemeral(nv); derr != nil {
		klog.ErrorS(derr, "Could not remove a failed ephemeral volume; the next start will", "volume", nv.vol.Name)
	}
	return err
}

// deleteEphemeral detaches an ephemeral volume's loop device and deletes the
// volume.
func (d *Node) deleteEphemeral(nv *nodeVolume) error {
	if nv.dev != nil {
		if err := d.kernel.Loops.Detach(nv.dev.Path); err != nil {
			return status.Errorf(codes.Internal, "detaching ephemeral volume %s: %v", nv.vol.Name, err)
		}
	}
	if err := nv.pool.DeleteVolume(nv.vol.Token()); err != nil {
		return err
	}
	klog.V(2).InfoS("Deleted ephemeral volume", "volume", nv.vol.Name, "spoolID", nv.vol.ID)
	return nil
}

// removeUnmountedTarget finishes the unpublish of an ephemeral volume that
// is gone: a target that is missing or an empty directory (what an
// interrupted publish or unpublish leaves) is removed and the call succeeds,
// so that the kubelet can tear the pod down. Anything else at the target (a
// mount, a file, a directory with entries) is not Spool's: the volume is
// NotFound and the path stays untouched.
func (d *Node) removeUnmountedTarget(id, target string) error {
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return err
	}
	if _, ok := fs.MountAt(mounts, target); ok {
		return notFoundf("volume %s not found; target path %s holds a mount, which stays", id, target)
	}
	var st unix.Stat_t
	if err := unix.Lstat(target, &st); err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return notFoundf("volume %s not found; target path %s is not a directory, and stays", id, target)
	}
	if err := fs.RemoveEmpty(target); errors.Is(err, fs.ErrNotEmpty) {
		return notFoundf("volume %s not found; target path %s is not empty, and stays", id, target)
	} else if err != nil {
		return status.Errorf(codes.Internal, "%v", err)
	}
	return nil
}

// deleteOrphanEphemerals runs at start, after orphan loop devices are
// detached: an ephemeral volume without a loop device is not mounted by any
// pod (its publish was interrupted, or its unpublish crashed), so it is
// deleted. The kubelet's retry of the publish makes it again.
func (d *Node) deleteOrphanEphemerals() {
	for _, p := range d.pools.all() {
		if p.Shared() {
			continue // no ephemeral volumes; and other nodes' loops are not visible here
		}
		for _, v := range p.List() {
			if !v.Ephemeral {
				continue
			}
			if dev, err := d.ownDevice(p, v.Token()); dev != nil || err != nil {
				continue
			}
			err := p.DeleteVolume(v.Token())
			d.metrics.Reconciled(metrics.ActionDeleteEphemeral, err)
			if err != nil {
				klog.ErrorS(err, "Could not delete an orphaned ephemeral volume", "volume", v.Name)
				continue
			}
			klog.InfoS("Deleted ephemeral volume that no pod uses (left by an interrupted publish or unpublish)", "volume", v.Name, "spoolID", v.ID)
		}
	}
}
