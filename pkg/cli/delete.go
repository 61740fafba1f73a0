package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

const deleteUsage = `Usage: spool volume delete --pool NAME=DIR[,capacity=SIZE] --node-id NODE [flags] HANDLE...

Deletes volumes by their handle, as the driver's DeleteVolume does: a volume
that is still attached (ControllerPublished) or staged on this node is
refused. Delete the PersistentVolume that names it first.

Flags:
`

func deleteVolumes(args []string, stdout, stderr io.Writer) error {
	var (
		c              common
		ignoreNotFound bool
	)
	fl := flag.NewFlagSet("spool volume delete", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, deleteUsage); fl.PrintDefaults() }
	c.register(fl)
	fl.BoolVar(&ignoreNotFound, "ignore-not-found", false, "treat a volume that does not exist as deleted")
	handles, err := parse(fl, args)
	if err != nil {
		return err
	}
	if err := c.check(); err != nil {
		return err
	}
	if len(handles) == 0 {
		return usagef("name at least one volume handle")
	}
	for _, h := range handles {
		id, err := volid.ParseKind(h, volid.KindVolume)
		if err != nil {
			return usagef("%q is not a volume handle: %v", h, err)
		}
		// A shared volume belongs to its pool, which must be declared
		// shared; a local one to its pool on its node.
		served := slices.ContainsFunc(c.pools, func(s pool.Spec) bool { return s.Name == id.Pool && s.Shared == id.Shared() })
		switch {
		case id.Shared() && !served:
			return usagef("volume %s lives in shared pool %s, which the --pool flags do not name as shared", h, id.Pool)
		case !id.Shared() && (id.Node != c.nodeID || !served):
			return usagef("volume %s lives in pool %s of node %s, which the --pool and --node-id flags do not name", h, id.Pool, id.Node)
		}
	}
	d, err := c.open()
	if err != nil {
		return err
	}
	defer d.Close()
	ctx := context.Background()
	for _, h := range handles {
		if _, err := d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: h}); status.Code(err) == codes.NotFound {
			if ignoreNotFound {
				continue
			}
			return fmt.Errorf("volume %s does not exist", h)
		} else if err != nil {
			return message(err)
		}
		if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: h}); err != nil {
			return message(err)
		}
		fmt.Fprintf(stdout, "deleted %s\n", h)
	}
	return nil
}
