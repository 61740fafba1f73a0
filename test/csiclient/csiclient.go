// Package csiclient starts a Spool driver in-process and walks volumes
// through the CSI calls a CO makes. The sanity-style tests, the lifecycle
// tests and the demo walk share it.
package csiclient

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/spool-csi/spool/driver"
)

// Client holds the CSI clients of one connection.
type Client struct {
	csi.IdentityClient
	csi.ControllerClient
	csi.NodeClient
	csi.SnapshotMetadataClient
	conn *grpc.ClientConn
}

// Dial connects to a unix:// endpoint.
func Dial(endpoint string) (*Client, error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", endpoint, err)
	}
	return &Client{
		IdentityClient:         csi.NewIdentityClient(conn),
		ControllerClient:       csi.NewControllerClient(conn),
		NodeClient:             csi.NewNodeClient(conn),
		SnapshotMetadataClient: csi.NewSnapshotMetadataClient(conn),
		conn:                   conn,
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// MountCap is a single-node-writer filesystem capability.
func MountCap(fsType string, flags ...string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType, MountFlags: flags}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// BlockCap is a single-node-writer raw block capability.
func BlockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// Volume is a volume being walked through its lifecycle.
type Volume struct {
	ID             string
	Cap            *csi.VolumeCapability
	PublishContext map[string]string
	Staging        string
	Target         string
	// Secrets are passed to NodeStageVolume (an encrypted volume's key).
	Secrets map[string]string
}

// Create creates a volume of n bytes and attaches it to node.
func (c *Client) Create(ctx context.Context, name string, n int64, vc *csi.VolumeCapability, params map[string]string, node, dir string) (*Volume, error) {
	cv, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: n},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: params,
	})
	if err != nil {
		return nil, fmt.Errorf("CreateVolume: %w", err)
	}
	v := &Volume{ID: cv.GetVolume().GetVolumeId(), Cap: vc,
		Staging: filepath.Join(dir, name+"-staging"), Target: filepath.Join(dir, name+"-target")}
	pub, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: v.ID, NodeId: node, VolumeCapability: vc})
	if err != nil {
		return v, fmt.Errorf("ControllerPublishVolume: %w", err)
	}
	v.PublishContext = pub.GetPublishContext()
	return v, nil
}

// StageAndPublish stages the volume and publishes it at its target.
func (c *Client) StageAndPublish(ctx context.Context, v *Volume) error {
	if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: v.ID, StagingTargetPath: v.Staging, VolumeCapability: v.Cap, PublishContext: v.PublishContext, Secrets: v.Secrets,
	}); err != nil {
		return fmt.Errorf("NodeStageVolume: %w", err)
	}
	if _, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: v.ID, StagingTargetPath: v.Staging, TargetPath: v.Target, VolumeCapability: v.Cap, PublishContext: v.PublishContext,
	}); err != nil {
		return fmt.Errorf("NodePublishVolume: %w", err)
	}
	return nil
}

// UnpublishAndUnstage undoes StageAndPublish.
func (c *Client) UnpublishAndUnstage(ctx context.Context, v *Volume) error {
	if _, err := c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.ID, TargetPath: v.Target}); err != nil {
		return fmt.Errorf("NodeUnpublishVolume: %w", err)
	}
	if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.ID, StagingTargetPath: v.Staging}); err != nil {
		return fmt.Errorf("NodeUnstageVolume: %w", err)
	}
	return nil
}

// Delete detaches the volume from node and deletes it.
func (c *Client) Delete(ctx context.Context, v *Volume, node string) error {
	if _, err := c.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.ID, NodeId: node}); err != nil {
		return fmt.Errorf("ControllerUnpublishVolume: %w", err)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.ID}); err != nil {
		return fmt.Errorf("DeleteVolume: %w", err)
	}
	return nil
}

// Start runs a driver in-process on opts.Endpoint until stop is called. The
// pools are released when stop returns, so a new driver may open them again:
// that is how tests restart the driver.
func Start(opts driver.Options) (d *driver.Driver, stop func() error, err error) {
	d, err = driver.New(opts, driver.RealKernel())
	if err != nil {
		return nil, nil, err
	}
	lis, err := d.Listen()
	if err != nil {
		d.Close()
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, lis) }()
	return d, func() error {
		cancel()
		err := <-done
		d.Close()
		return err
	}, nil
}

// WriteFile writes data to a new file at path and fsyncs it, so that the
// bytes are on the volume before the caller unstages it.
func WriteFile(path string, data []byte) error {
	return writeSync(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, data, 0)
}

// WriteAt writes data at offset off of an existing file or block device and
// fsyncs it.
func WriteAt(path string, data []byte, off int64) error {
	return writeSync(path, os.O_WRONLY, data, off)
}

func writeSync(path string, flag int, data []byte, off int64) error {
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, off); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}
