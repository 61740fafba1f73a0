package driver

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
)

// Health reasons (CamelCase, for machines).
const (
	reasonImageMissing       = "ImageMissing"
	reasonDeviceDetached     = "DeviceDetached"
	reasonForeignMount       = "ForeignMount"
	reasonFilesystemReadOnly = "FilesystemReadOnly"
	reasonPoolUnreachable    = "PoolUnreachable"
	reasonPoolNearlyFull     = "PoolNearlyFull"
	reasonImageTruncated     = "ImageTruncated"
	reasonPoolOvercommitted  = "PoolOvercommitted"
	reasonAttachmentLost     = "AttachmentLost"
	reasonDeviceReconfigured = "DeviceReconfigured"
	reasonInvalidObjects     = "InvalidObjects"
)

// poolNearlyFull is the share of a pool's capacity that, once provisioned,
// makes the node report the pool degraded.
const poolNearlyFull = 0.95

// NodeGetVolumeHealth reports what is wrong with a volume on this node: its
// image is gone, its loop device vanished under a mount, or its filesystem
// turned read-only after errors. An empty list means healthy.
func (d *Node) NodeGetVolumeHealth(_ context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
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
	if nv.imageErr != nil {
		add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonImageMissing, fmt.Sprintf("image file is not usable: %v", nv.imageErr))
	}
	if why := d.fenceLost(nv.pool, nv.vol, nv.dev != nil); why != "" {
		add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonAttachmentLost, why)
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
			case !ofDevice(m, nv.dev):
				add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonForeignMount, fmt.Sprintf("%s holds a mount that is not this volume", target))
			}
		}
	}
	if problems := d.checkDevice(nv); len(problems) > 0 {
		add(csi.VolumeHealthErrorType_DEGRADED, reasonDeviceReconfigured, strings.Join(problems, "; "))
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

// checkDevice re-verifies the volume's loop device, which a pod with raw
// block access can reconfigure through its device node (LOOP_SET_STATUS64):
// autoclear would detach it at the last close, under the pod, and is
// cleared again; partition scanning makes the kernel create partition
// devices from the bytes the pod wrote, cannot be turned off, and is
// reported. (A device whose backing file was changed no longer matches the
// image and is not found at all: see unstageForeignBlock.) It returns what
// is still wrong.
func (d *Node) checkDevice(nv *nodeVolume) []string {
	dev := nv.dev
	if dev == nil {
		return nil
	}
	var problems []string
	if dev.Autoclear {
		if err := d.kernel.Loops.ClearAutoclear(dev.Path, dev.Rdev); err != nil {
			problems = append(problems, fmt.Sprintf("%s has autoclear set (it would detach at its last close) and it could not be cleared: %v", dev.Path, err))
		} else {
			dev.Autoclear = false
			klog.InfoS("Cleared autoclear on a loop device something set it on", "volumeID", nv.vol.ID, "device", dev.Path)
		}
	}
	if dev.PartScan {
		problems = append(problems, fmt.Sprintf("%s has partition scanning on: the kernel made partition devices from the volume's bytes; unstage and stage the volume again for a clean device", dev.Path))
	}
	if len(problems) > 0 {
		klog.ErrorS(nil, "Loop device of a volume was reconfigured", "volumeID", nv.vol.ID, "device", dev.Path, "problems", problems)
	}
	return problems
}

// NodeGetStorageHealth reports pools that are unreachable or nearly full.
func (d *Node) NodeGetStorageHealth(context.Context, *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	resp := &csi.NodeGetStorageHealthResponse{}
	for _, p := range d.pools.all() {
		name := p.Name()
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
		if bad := p.Invalid(); len(bad) > 0 {
			resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
				Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: reasonInvalidObjects,
				Message: fmt.Sprintf("pool %s holds %d objects whose metadata is not what Spool writes, left untouched and not served: %s", name, len(bad), strings.Join(bad[:min(len(bad), 5)], ", ")),
			})
		}
	}
	return resp, nil
}

// controllerHealth is what the controller can tell about a volume from its
// pool: whether its image is there and whole, and whether the pool can still
// hold every byte it promised.
func (d *Controller) controllerHealth(p *pool.Pool, v pool.Volume, c pool.Capacity) []*csi.VolumeHealth_VolumeHealthEntry {
	var out []*csi.VolumeHealth_VolumeHealthEntry
	add := func(st csi.VolumeHealthErrorType, reason, msg string) {
		out = append(out, &csi.VolumeHealth_VolumeHealthEntry{Status: st, Reason: reason, Message: msg})
	}
	f, err := p.OpenImage(v.Token(), unix.O_PATH)
	var fi os.FileInfo
	if err == nil {
		fi, err = f.Stat()
		_ = f.Close()
	}
	switch {
	case err != nil:
		add(csi.VolumeHealthErrorType_INACCESSIBLE, reasonImageMissing, fmt.Sprintf("image file is not usable: %v", err))
		return out
	case fi.Size() < v.CapacityBytes:
		add(csi.VolumeHealthErrorType_DEGRADED, reasonImageTruncated, fmt.Sprintf("image holds %d bytes, the volume %d", fi.Size(), v.CapacityBytes))
	}
	if v.Provisioning == pool.Thin && c.Unbacked > 0 {
		add(csi.VolumeHealthErrorType_DEGRADED, reasonPoolOvercommitted,
			fmt.Sprintf("pool %s lacks %d bytes to back every provisioned byte: writes to thin volumes may fail with ENOSPC", p.Name(), c.Unbacked))
	}
	return out
}

// ControllerGetVolumeHealth reports a volume's health as seen from its pool.
func (d *Controller) ControllerGetVolumeHealth(_ context.Context, req *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, invalidf("volume ID is missing")
	}
	p, v, err := d.pools.volume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	c, err := p.Capacity()
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: v.ID, HealthStatuses: d.controllerHealth(p, v, c)}}, nil
}

// ControllerListVolumeHealth reports the health of every volume, in ID
// order, paged like ListVolumes.
func (d *Controller) ControllerListVolumeHealth(_ context.Context, req *csi.ControllerListVolumeHealthRequest) (*csi.ControllerListVolumeHealthResponse, error) {
	page, next, err := d.pools.volumePage(req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	caps := map[*pool.Pool]pool.Capacity{}
	resp := &csi.ControllerListVolumeHealthResponse{NextToken: next}
	for _, e := range page {
		c, ok := caps[e.p]
		if !ok {
			if c, err = e.p.Capacity(); err != nil {
				return nil, err
			}
			caps[e.p] = c
		}
		resp.Entries = append(resp.Entries, &csi.VolumeHealth{VolumeId: e.v.ID, HealthStatuses: d.controllerHealth(e.p, e.v, c)})
	}
	return resp, nil
}
