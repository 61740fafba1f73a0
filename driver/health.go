package driver

import (
	"context"
	"fmt"
	"os"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/pkg/fs"
)

// Health reasons (CamelCase, for machines).
const (
	reasonImageMissing       = "ImageMissing"
	reasonDeviceDetached     = "DeviceDetached"
	reasonForeignMount       = "ForeignMount"
	reasonFilesystemReadOnly = "FilesystemReadOnly"
	reasonPoolUnreachable    = "PoolUnreachable"
	reasonPoolNearlyFull     = "PoolNearlyFull"
)

// poolNearlyFull is the share of a pool's capacity that, once provisioned,
// makes the node report the pool degraded.
const poolNearlyFull = 0.95

// NodeGetVolumeHealth reports what is wrong with a volume on this node: its
// image is gone, its loop device vanished under a mount, or its filesystem
// turned read-only after errors. An empty list means healthy.
func (d *Driver) NodeGetVolumeHealth(_ context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalidf("volume ID is missing")
	}
	var paths []string
	for field, p := range map[string]string{"volume publish path": req.GetVolumePublishPath(), "staging target path": req.GetStagingTargetPath()} {
		if p == "" {
			continue
		}
		clean, err := checkPath(field, p)
		if err != nil {
			return nil, err
		}
		paths = append(paths, clean)
	}
	nv, err := d.nodeLookup(id)
	if err != nil {
		return nil, err
	}
	mounts, err := d.kernel.Mounter.Mounts()
	if err != nil {
		return nil, err
	}
	var out []*csi.VolumeHealth_VolumeHealthEntry
	add := func(st csi.VolumeHealthErrorType, reason, msg string) {
		out = append(out, &csi.VolumeHealth_VolumeHealthEntry{Status: st, Reason: reason, Message: msg})
	}
	if _, err := os.Stat(nv.image); err != nil {
		add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonImageMissing, fmt.Sprintf("image file is not reachable: %v", err))
	}
	for _, p := range paths {
		for _, target := range []string{p, p + "/" + blockMarker} {
			m, ok := fs.MountAt(mounts, target)
			if !ok {
				continue
			}
			switch {
			case nv.dev == nil:
				add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonDeviceDetached, fmt.Sprintf("%s is mounted but the volume's loop device is gone", target))
			case !fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev) && !fs.IsDeviceNodeBind(m, nv.dev.Path):
				add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonForeignMount, fmt.Sprintf("%s holds a mount that is not this volume", target))
			}
		}
	}
	if nv.dev != nil {
		for _, m := range mounts {
			if !fs.IsDeviceMount(m, nv.dev.Path, nv.dev.Rdev) || !slices.Contains(m.MountOptions, "rw") {
				continue
			}
			if st, err := d.kernel.Mounter.Stats(m.MountPoint); err == nil && st.ReadOnly {
				add(csi.VolumeHealthErrorType_DEGRADED, reasonFilesystemReadOnly,
					fmt.Sprintf("the filesystem at %s was mounted read-write and is now read-only (I/O or filesystem errors)", m.MountPoint))
				break
			}
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: id, HealthStatuses: out}}, nil
}

// NodeGetStorageHealth reports pools that are unreachable or nearly full.
func (d *Driver) NodeGetStorageHealth(context.Context, *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	resp := &csi.NodeGetStorageHealthResponse{}
	for _, name := range d.poolOrder {
		p := d.pools[name]
		c, err := p.Capacity()
		switch {
		case err != nil:
			resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
				Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: reasonPoolUnreachable,
				Message: fmt.Sprintf("pool %s: %v", name, err),
			})
		case c.Total > 0 && float64(c.Provisioned) >= poolNearlyFull*float64(c.Total):
			resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
				Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: reasonPoolNearlyFull,
				Message: fmt.Sprintf("pool %s has %d of %d bytes provisioned", name, c.Provisioned, c.Total),
			})
		}
	}
	return resp, nil
}
