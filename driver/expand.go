package driver

import (
	"context"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
)

// ControllerExpandVolume grows a volume's image. The loop device and the
// filesystem follow on the node (NodeExpandVolume, or the next stage).
func (d *Controller) ControllerExpandVolume(_ context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	if req.GetCapacityRange() == nil {
		return nil, invalidf("capacity range is missing")
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	p, vid, unlock, err := d.lockResolved(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.expandImage(p, vid.Token, req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.CapacityBytes, NodeExpansionRequired: true}, nil
}

// expandImage grows the image to the size the range asks for. Shrinking is
// refused; a volume that is already large enough is left as it is.
func (d *core) expandImage(p *pool.Pool, token string, r *csi.CapacityRange) (pool.Volume, error) {
	if r.GetRequiredBytes() < 0 || r.GetLimitBytes() < 0 {
		return pool.Volume{}, invalidf("capacity range must not be negative (required %d, limit %d)", r.GetRequiredBytes(), r.GetLimitBytes())
	}
	v, err := p.Get(token)
	if err != nil {
		return pool.Volume{}, err
	}
	if lim := r.GetLimitBytes(); lim > 0 && lim < v.CapacityBytes {
		return pool.Volume{}, status.Errorf(codes.OutOfRange, "volume %s is %d bytes; volumes cannot shrink to the limit of %d", v.ID, v.CapacityBytes, lim)
	}
	if r.GetRequiredBytes() <= v.CapacityBytes {
		return v, nil
	}
	n, err := volumeSize(r, v.FSType)
	if err != nil {
		return pool.Volume{}, err
	}
	return p.ExpandVolume(token, n)
}

// NodeExpandVolume makes the loop device see the image's new size
// (LOOP_SET_CAPACITY) and grows the filesystem online. When the controller
// could not grow the image (a node-local pool served by the node alone), it
// grows the image first.
func (d *Node) NodeExpandVolume(_ context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	path, err := checkVolumePath(id, req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	nv, unlock, err := d.lockNodeVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if nv.dev == nil {
		return nil, preconditionf("volume %s is not staged on this node", id)
	}
	if r := req.GetCapacityRange(); r != nil {
		if nv.vol, err = d.expandImage(nv.pool, nv.vol.Token(), r); err != nil {
			return nil, err
		}
	}
	n, err := d.kernel.Loops.SetCapacity(nv.dev.Path)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "refreshing the size of %s: %v", nv.dev.Path, err)
	}
	faults.Point("nodeexpand-capacity-set")
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	// The filesystem is grown through its staging mount when the CO names
	// it, else through the published path.
	var mnt string
	for _, p := range []string{req.GetStagingTargetPath(), path} {
		if p == "" {
			continue
		}
		if m, ok := fs.MountAt(mounts, filepath.Clean(p)); ok && fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev) {
			mnt = m.MountPoint
			break
		}
	}
	if mnt == "" {
		if m, ok := fs.MountAt(mounts, path); ok && fs.IsDeviceNodeBind(m, nv.dev.Path) {
			klog.V(2).InfoS("Expanded block volume", "volumeID", id, "bytes", n)
			return &csi.NodeExpandVolumeResponse{CapacityBytes: n}, nil
		}
		return nil, notFoundf("volume %s is not mounted at %s", id, path)
	}
	if err := d.growFilesystem(nv, mnt, nv.vol.FSType); err != nil {
		return nil, err
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: n}, nil
}

// growFilesystem grows the filesystem mounted at mnt to fill its device if
// it is smaller. fsType is the filesystem the caller found ("": probe).
func (d *Node) growFilesystem(nv *nodeVolume, mnt, fsType string) error {
	need, err := d.kernel.Mounter.NeedResize(nv.dev.Path, mnt, fsType)
	if err != nil {
		return status.Errorf(codes.Internal, "checking the filesystem size of %s: %v", nv.vol.ID, err)
	}
	if !need {
		return nil
	}
	if err := d.kernel.Mounter.Resize(nv.dev.Path, mnt); err != nil {
		return status.Errorf(codes.Internal, "growing the filesystem of %s: %v", nv.vol.ID, err)
	}
	klog.V(2).InfoS("Grew filesystem", "volumeID", nv.vol.ID, "device", nv.dev.Path, "mount", mnt)
	return nil
}
