package driver

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/pool"
)

// Shared pools live on storage every node mounts (pkg/pool/shared.go). A
// volume of a shared pool can be staged on any node that has the pool, and
// ControllerPublishVolume is the fence: the attachment recorded in the pool,
// with its generation, is what NodeStageVolume verifies, and what a node
// that lost it (force detach) notices afterwards.

// ctxPoolID carries the ID of a shared pool from ControllerPublish to
// NodeStage: a node that mounted another share under the same path refuses.
const ctxPoolID = "spool.csi.dev/pool-id"

// sharedPresent is the value of a shared pool's topology key on nodes that
// have the pool mounted.
const sharedPresent = "present"

// fenceCheckInterval is how often a node plugin checks that the volumes of
// shared pools it has staged are still attached to it.
const fenceCheckInterval = 30 * time.Second

// SharedTopologyKey is the topology key of a shared pool: the nodes that
// have it mounted report it with the value "present", and its volumes are
// accessible wherever it is.
func SharedTopologyKey(driverName, poolName string) string {
	return driverName + "/pool-" + poolName
}

// poolSegments is the topology of a pool's volumes.
func (d *core) poolSegments(p *pool.Pool) map[string]string {
	if p.Shared() {
		return map[string]string{SharedTopologyKey(d.opts.DriverName, p.Name()): sharedPresent}
	}
	return map[string]string{d.topologyKey: p.Node()}
}

// topologyMatches reports whether the pool's volumes are accessible in
// topology t.
func (d *core) topologyMatches(p *pool.Pool, t *csi.Topology) bool {
	for k, v := range d.poolSegments(p) {
		if t.GetSegments()[k] != v {
			return false
		}
	}
	return true
}

// nodeSegments is this node's topology: its node ID when it has a local
// pool, and every shared pool that is really there (its identity file
// readable and unchanged). A node with only shared pools reports no node
// key: nothing of it is reachable from this node alone, and the
// provisioner then tracks a shared pool's capacity once, not once per node.
func (d *Node) nodeSegments() map[string]string {
	seg := map[string]string{}
	for _, p := range d.pools.all() {
		if !p.Shared() {
			seg[d.topologyKey] = d.opts.NodeID
			continue
		}
		if err := p.CheckIdentity(); err != nil {
			klog.ErrorS(err, "Shared pool is not available on this node; not reporting its topology", "pool", p.Name())
			continue
		}
		maps.Copy(seg, d.poolSegments(p))
	}
	return seg
}

// checkModeForPool refuses access modes the pool cannot give: volumes of
// local pools serve one node; shared pools also serve many readers, and
// many writers of raw block devices (for applications that coordinate their
// writes themselves).
func checkModeForPool(p *pool.Pool, c *csi.VolumeCapability) error {
	mode := c.GetAccessMode().GetMode()
	switch mode {
	case csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		if !p.Shared() {
			return invalidf("access mode %s needs a shared pool: pool %s is local to node %s", mode, p.Name(), p.Node())
		}
	case csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER:
		if !p.Shared() {
			return invalidf("access mode %s needs a shared pool: pool %s is local to node %s", mode, p.Name(), p.Node())
		}
		if c.GetBlock() == nil {
			return invalidf("access mode %s is for raw block volumes only: no filesystem Spool mounts can be written from two nodes at once", mode)
		}
	}
	return nil
}

// multiNode reports whether an access mode lets several nodes attach.
func multiNode(mode string) bool {
	return mode == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY.String() ||
		mode == csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER.String()
}

// canJoin decides whether a volume with these attachments may also be
// attached to node in mode: only when every attachment is multi-node in the
// same mode.
func canJoin(v *pool.Volume, node, mode string) error {
	for _, a := range v.Attachments {
		if a.Node == node {
			continue
		}
		if !multiNode(mode) || a.AccessMode != mode {
			return preconditionf("volume %s is attached to node %s (%s); it cannot be attached to %s (%s) too", v.ID, a.Node, a.AccessMode, node, mode)
		}
	}
	return nil
}

// checkSharedStage verifies, at NodeStage, that the pool is the one the
// controller attached the volume in and is still mounted here.
func checkSharedStage(p *pool.Pool, v pool.Volume, pc map[string]string) error {
	if err := p.CheckIdentity(); err != nil {
		return preconditionf("volume %s: %v", v.ID, err)
	}
	if id := pc[ctxPoolID]; id != p.ID() {
		return preconditionf("volume %s was attached in pool %s with ID %q, but this node's %s holds pool ID %s: the nodes mount different shares", v.ID, p.Name(), id, p.Root(), p.ID())
	}
	return nil
}

// fences remembers, for each volume of a shared pool staged on this node,
// the attachment generation it was staged with.
type fences struct {
	mu   sync.Mutex
	gens map[string]uint64 // volume ID -> generation
	lost map[string]string // volume ID -> why the fence was lost
}

func (f *fences) set(id string, gen uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gens == nil {
		f.gens, f.lost = map[string]uint64{}, map[string]string{}
	}
	f.gens[id] = gen
	delete(f.lost, id)
}

func (f *fences) drop(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.gens, id)
	delete(f.lost, id)
}

func (f *fences) ids() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Sorted(maps.Keys(f.gens))
}

func (f *fences) get(id string) (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.gens[id]
	return g, ok
}

// fenceLost reports why this node no longer holds the attachment of a
// volume of a shared pool it has staged ("" while it does, or when the
// volume is not staged here).
func (d *Node) fenceLost(p *pool.Pool, v pool.Volume, staged bool) string {
	if !p.Shared() {
		return ""
	}
	if _, ok := d.fences.get(v.ID); !ok && !staged {
		return ""
	}
	if err := p.CheckIdentity(); err != nil {
		return err.Error()
	}
	a, ok := v.AttachmentFor(d.opts.NodeID)
	if !ok {
		return fmt.Sprintf("volume %s is no longer attached to this node %s (force-detached?): stop writing to it", v.ID, d.opts.NodeID)
	}
	if gen, ok := d.fences.get(v.ID); ok && gen != a.Generation {
		return fmt.Sprintf("volume %s was detached from this node and attached again (generation %d, staged with %d): this staging is stale", v.ID, a.Generation, gen)
	}
	return ""
}

// watchFences checks every interval that the staged volumes of shared pools
// are still attached to this node, and logs loudly when one is not: its
// volume condition turns abnormal (NodeGetVolumeStats) at the same time.
func (d *Node) watchFences(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, id := range d.fences.ids() {
			p, v, err := d.pools.volume(id)
			why := ""
			if err != nil {
				why = fmt.Sprintf("volume %s cannot be read from its pool: %v", id, err)
			} else {
				why = d.fenceLost(p, v, true)
			}
			d.fences.mu.Lock()
			before, known := d.fences.lost[id]
			if _, staged := d.fences.gens[id]; staged {
				if why == "" {
					delete(d.fences.lost, id)
				} else {
					d.fences.lost[id] = why
				}
			}
			d.fences.mu.Unlock()
			if why != "" && (!known || before != why) {
				klog.ErrorS(nil, "Lost the attachment of a staged shared volume", "volumeID", id, "node", d.opts.NodeID, "reason", why)
			}
		}
	}
}

// registerSharedPools records this node in every shared pool it serves, so
// that controllers attach its volumes to it: a node whose share is not
// mounted cannot write the record.
func (d *Node) registerSharedPools() error {
	for _, p := range d.pools.all() {
		if p.Shared() {
			if err := p.RegisterNode(d.opts.NodeID); err != nil {
				return err
			}
		}
	}
	return nil
}

// sharedPublishContext adds the shared pool's ID to a publish context.
func sharedPublishContext(p *pool.Pool, pc map[string]string) map[string]string {
	if p.Shared() {
		pc[ctxPoolID] = p.ID()
	}
	return pc
}

// generationOf parses the generation of a publish context.
func generationOf(pc map[string]string) (uint64, bool) {
	g, err := strconv.ParseUint(pc[ctxGeneration], 10, 64)
	return g, err == nil
}

// checkFence checks, at every NodeGetVolumeStats (the kubelet's periodic
// call), that this node still holds the attachment of a volume of a shared
// pool, and logs an error when it does not. NodeGetVolumeHealth reports the
// same as AttachmentLost.
func (d *Node) checkFence(nv *nodeVolume) {
	if why := d.fenceLost(nv.pool, nv.vol, nv.dev != nil); why != "" {
		klog.ErrorS(nil, "Volume in use on this node is no longer attached to it", "volumeID", nv.vol.ID, "node", d.opts.NodeID, "reason", why)
	}
}

// adoptSharedStagings, at start, watches the volumes of shared pools that
// are still staged on this node (their loop devices survived a restart of
// the node plugin) with the attachment the node holds now; a volume the
// node no longer holds is reported at once.
func (d *Node) adoptSharedStagings() error {
	if !d.pools.anyShared() {
		return nil
	}
	devs, err := d.ownedDevices()
	if err != nil {
		return err
	}
	for _, od := range devs {
		dev, p, token := od.Device, od.pool, od.token
		if !p.Shared() {
			continue
		}
		v, err := p.Get(token)
		if err != nil {
			klog.ErrorS(err, "A loop device of this node is backed by a volume its shared pool no longer has", "device", dev.Path, "image", dev.BackingFile)
			continue
		}
		a, ok := v.AttachmentFor(d.opts.NodeID)
		if !ok {
			klog.ErrorS(nil, "Volume staged on this node is no longer attached to it (force-detached while the node plugin was down)", "volumeID", v.ID, "device", dev.Path)
			d.fences.set(v.ID, 0) // generations start at 1: never matches
			continue
		}
		if !a.Staged {
			klog.ErrorS(nil, "Volume staged on this node was detached and attached to it again while the node plugin was down: this staging is stale", "volumeID", v.ID, "device", dev.Path, "generation", a.Generation)
			d.fences.set(v.ID, 0)
			continue
		}
		d.fences.set(v.ID, a.Generation)
		klog.V(2).InfoS("Watching the attachment of a volume staged before a restart", "volumeID", v.ID, "generation", a.Generation)
	}
	return nil
}

// markStaged verifies, under the volume's lock in the pool, that this node
// holds the attachment of generation gen, and marks it staged: the check
// and the mark are one step, so a detach cannot slip in between.
func (d *Node) markStaged(p *pool.Pool, v pool.Volume, gen uint64) error {
	_, err := p.Update(v.Token(), func(v *pool.Volume) error {
		for i, a := range v.Attachments {
			if a.Node != d.opts.NodeID {
				continue
			}
			if a.Generation != gen {
				return preconditionf("publish context of volume %s is stale: attachment generation %d, current %d", v.ID, gen, a.Generation)
			}
			if a.Staged {
				return pool.ErrUnchanged
			}
			v.Attachments[i].Staged = true
			return nil
		}
		return preconditionf("volume %s is not attached to node %s", v.ID, d.opts.NodeID)
	})
	return err
}
