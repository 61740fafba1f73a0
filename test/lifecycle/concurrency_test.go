package lifecycle

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/test/csiclient"
)

// 64 concurrent CreateVolume calls with one name make one volume: every
// call answers it or Aborted, and a retry after Aborted answers it.
func TestConcurrentCreateSameName(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	req := &csi.CreateVolumeRequest{Name: "contended", VolumeCapabilities: []*csi.VolumeCapability{csiclient.MountCap("ext4")},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}}
	var wg sync.WaitGroup
	ids := make(chan string, 64)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				r, err := e.c.CreateVolume(c, req)
				if status.Code(err) == codes.Aborted {
					continue
				}
				if err != nil {
					t.Errorf("CreateVolume: %v", err)
					return
				}
				ids <- r.GetVolume().GetVolumeId()
				return
			}
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[string]bool{}
	for id := range ids {
		seen[id] = true
	}
	if len(seen) != 1 || e.volumeCount() != 1 {
		t.Fatalf("64 creates of one name made IDs %v and %d volumes, want one", seen, e.volumeCount())
	}
	for id := range seen {
		if _, err := e.c.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

// Goroutines race attach, stage, publish and their undoing on a few
// volumes. Every call succeeds or answers Aborted or FailedPrecondition
// (an order the racing CO broke); afterwards every volume's metadata loads
// after a restart and, cleaned up in order, nothing leaks.
func TestNodeOperationStorm(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	const nVols, workers, rounds = 6, 4, 12
	var vols []*csiclient.Volume
	for i := range nVols {
		vc := csiclient.MountCap("ext4")
		if i%3 == 2 {
			vc = csiclient.BlockCap()
		}
		cv, err := e.c.CreateVolume(c, &csi.CreateVolumeRequest{Name: fmt.Sprintf("storm-%d", i), VolumeCapabilities: []*csi.VolumeCapability{vc},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		v := &csiclient.Volume{ID: cv.GetVolume().GetVolumeId(), Cap: vc,
			Staging: filepath.Join(e.dir, fmt.Sprintf("storm-%d-staging", i)), Target: filepath.Join(e.dir, fmt.Sprintf("storm-%d-target", i))}
		vols = append(vols, v)
		e.cleanupVolume(v)
	}
	var pcMu sync.Mutex
	pcs := map[string]map[string]string{}
	ops := []func(v *csiclient.Volume) error{
		func(v *csiclient.Volume) error {
			r, err := e.c.ControllerPublishVolume(c, &csi.ControllerPublishVolumeRequest{VolumeId: v.ID, NodeId: node, VolumeCapability: v.Cap})
			if err == nil {
				pcMu.Lock()
				pcs[v.ID] = r.GetPublishContext()
				pcMu.Unlock()
			}
			return err
		},
		func(v *csiclient.Volume) error {
			pcMu.Lock()
			pc := pcs[v.ID]
			pcMu.Unlock()
			_, err := e.c.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: pc})
			return err
		},
		func(v *csiclient.Volume) error {
			pcMu.Lock()
			pc := pcs[v.ID]
			pcMu.Unlock()
			_, err := e.c.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: v.Target, VolumeCapability: v.Cap, PublishContext: pc})
			return err
		},
		func(v *csiclient.Volume) error {
			_, err := e.c.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: v.Target})
			return err
		},
		func(v *csiclient.Volume) error {
			_, err := e.c.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging})
			return err
		},
		func(v *csiclient.Volume) error {
			_, err := e.c.ControllerUnpublishVolume(c, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.ID, NodeId: node})
			return err
		},
	}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 42))
			for range rounds * nVols {
				v := vols[r.IntN(nVols)]
				if err := ops[r.IntN(len(ops))](v); err != nil {
					switch status.Code(err) {
					case codes.Aborted, codes.FailedPrecondition:
					default:
						t.Errorf("%s: %v", v.ID, err)
					}
				}
			}
		}()
	}
	wg.Wait()
	// Undo whatever the storm left, in the CO's order.
	for _, v := range vols {
		if err := e.c.UnpublishAndUnstage(context.Background(), v); err != nil {
			t.Errorf("cleaning up %s: %v", v.ID, err)
		}
		if _, err := e.c.ControllerUnpublishVolume(context.Background(), &csi.ControllerUnpublishVolumeRequest{VolumeId: v.ID, NodeId: node}); err != nil {
			t.Errorf("cleaning up %s: %v", v.ID, err)
		}
	}
	e.restart()
	if n := e.volumeCount(); n != nVols {
		t.Fatalf("%d volumes load after the storm and a restart, want %d", n, nVols)
	}
	for _, v := range vols {
		gv, err := e.c.ControllerGetVolume(ctx(t), &csi.ControllerGetVolumeRequest{VolumeId: v.ID})
		if err != nil || len(gv.GetStatus().GetPublishedNodeIds()) != 0 {
			t.Errorf("volume %s after the storm: %v %v", v.ID, gv, err)
		}
	}
}
