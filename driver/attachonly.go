package driver

import (
	"context"
	"strconv"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// A controller with no pools (--mode=controller without --pool) is the
// attach controller of the local flavour: a central Deployment runs it with
// csi-attacher, while each node's spool holds that node's pools. It cannot
// read a node's pool, so it cannot record the attachment there. A node-local
// volume can only ever be used on the node its ID names, so the controller
// checks that and hands the node a publish context that says so; NodeStage
// then checks the volume in its own pool and records the attachment itself,
// and NodeUnstage releases it.

// attachOnly reports whether this driver is such an attach controller.
func (d *Controller) attachOnly() bool {
	return d.opts.Mode == ModeController && len(d.pools.all()) == 0
}

// publishNodeLocal answers ControllerPublishVolume without the pool.
func (d *Controller) publishNodeLocal(req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	vid, err := volid.ParseKind(id, volid.KindVolume)
	if err != nil {
		return nil, notFoundf("volume %q not found: %v", id, err)
	}
	if vid.Shared() {
		return nil, notFoundf("volume %s is in shared pool %s, which this attach controller does not serve: shared pools need a controller with --pool %s=DIR,shared", id, vid.Pool, vid.Pool)
	}
	if node != vid.Node {
		return nil, notFoundf("node %q not found: volume %s lives in a local pool of node %s", node, id, vid.Node)
	}
	if m := req.GetVolumeCapability().GetAccessMode().GetMode().String(); multiNode(m) {
		return nil, invalidf("access mode %s needs a shared pool: volume %s is local to node %s", m, id, vid.Node)
	}
	klog.V(2).InfoS("Attached node-local volume (the node records it at stage)", "volumeID", id, "node", node, "readonly", req.GetReadonly())
	return &csi.ControllerPublishVolumeResponse{PublishContext: map[string]string{
		ctxNode:       node,
		ctxReadOnly:   strconv.FormatBool(req.GetReadonly()),
		ctxAttachedBy: "node",
	}}, nil
}

// recordNodeAttachment records, at NodeStage, an attachment published by
// an attach controller that has no access to the pool. It refuses when the
// pool says the volume is attached to another node.
func (d *Node) recordNodeAttachment(nv *nodeVolume, pc map[string]string) (bool, error) {
	ro, err := strconv.ParseBool(pc[ctxReadOnly])
	if err != nil {
		return false, invalidf("publish context of volume %s: %s=%q is not a boolean", nv.vol.ID, ctxReadOnly, pc[ctxReadOnly])
	}
	vid, err := volid.ParseKind(nv.vol.ID, volid.KindVolume)
	if err != nil {
		return false, err
	}
	node := d.opts.NodeID
	d.attachMu.Lock()
	defer d.attachMu.Unlock()
	var att pool.Attachment
	v, err := nv.pool.Update(vid.Token, func(v *pool.Volume) error {
		for _, a := range v.Attachments {
			if a.Node != node {
				return preconditionf("volume %s is attached to node %s", v.ID, a.Node)
			}
			if a.ByNode && a.ReadOnly != ro {
				// A new publish with another read-only flag: record it anew.
				continue
			}
			att = a
			return nil
		}
		v.Generation++
		att = pool.Attachment{Node: node, ReadOnly: ro, AccessMode: "node-local", Generation: v.Generation, ByNode: true}
		kept := v.Attachments[:0]
		for _, a := range v.Attachments {
			if !a.ByNode {
				kept = append(kept, a)
			}
		}
		v.Attachments = append(kept, att)
		return nil
	})
	if err != nil {
		return false, err
	}
	nv.vol = v
	return att.ReadOnly, nil
}

// releaseNodeAttachment removes, at NodeUnstage, the attachment the node
// recorded at stage.
func (d *Node) releaseNodeAttachment(nv *nodeVolume) error {
	if _, ok := nv.vol.AttachmentFor(d.opts.NodeID); !ok {
		return nil
	}
	vid, err := volid.ParseKind(nv.vol.ID, volid.KindVolume)
	if err != nil {
		return err
	}
	d.attachMu.Lock()
	defer d.attachMu.Unlock()
	_, err = nv.pool.Update(vid.Token, func(v *pool.Volume) error {
		kept := v.Attachments[:0]
		for _, a := range v.Attachments {
			if !(a.ByNode && a.Node == d.opts.NodeID) {
				kept = append(kept, a)
			}
		}
		v.Attachments = kept
		return nil
	})
	return err
}

// resizerNode is the node service an attach controller serves to
// csi-resizer, which shares its socket: a controller that cannot expand
// volumes (no EXPAND_VOLUME) makes the resizer ask NodeGetCapabilities
// whether the node expands them alone, and without an answer it exits. It
// says yes: the node's spool grows the image and the filesystem in
// NodeExpandVolume. Every other node call is Unimplemented here.
type resizerNode struct{ csi.UnimplementedNodeServer }

func (resizerNode) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{{
		Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: csi.NodeServiceCapability_RPC_EXPAND_VOLUME}},
	}}}, nil
}
