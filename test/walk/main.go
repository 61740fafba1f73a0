// Command walk takes one volume through the CSI calls Kubernetes makes
// (create, attach, stage, publish, write, unpublish, unstage, stage again,
// read back, clean up) against a running Spool driver, printing each step.
// `make run` and `make demo` use it.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/test/csiclient"
)

func main() {
	endpoint := flag.String("endpoint", "", "driver endpoint, unix:///path/csi.sock")
	dir := flag.String("dir", "", "directory for the staging and target paths")
	fsType := flag.String("fs-type", "ext4", "filesystem of the volume")
	flag.Parse()
	if err := walk(*endpoint, *dir, *fsType); err != nil {
		fmt.Fprintln(os.Stderr, "walk failed:", err)
		os.Exit(1)
	}
}

func step(name string, fn func() error) error {
	start := time.Now()
	if err := fn(); err != nil {
		fmt.Printf("  %-58s FAILED\n", name)
		return fmt.Errorf("%s: %w", name, err)
	}
	fmt.Printf("  %-58s ok  %6.1f ms\n", name, float64(time.Since(start).Microseconds())/1000)
	return nil
}

func walk(endpoint, dir, fsType string) error {
	c, err := csiclient.Dial(endpoint)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	info, err := c.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return err
	}
	ni, err := c.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return err
	}
	node := ni.GetNodeId()
	fmt.Printf("driver %s %s on node %s\n", info.GetName(), info.GetVendorVersion(), node)

	var v *csiclient.Volume
	if err := step("CreateVolume + ControllerPublishVolume", func() (err error) {
		v, err = c.Create(ctx, "walk-"+fsType, 64<<20, csiclient.MountCap(fsType), nil, node, dir)
		return err
	}); err != nil {
		return err
	}
	fmt.Printf("  volume ID %s\n", v.ID)
	defer func() {
		_ = c.UnpublishAndUnstage(context.Background(), v)
		_ = c.Delete(context.Background(), v, node)
	}()
	msg := []byte(fmt.Sprintf("hello from spool at %s\n", time.Now().Format(time.RFC3339Nano)))
	file := filepath.Join(v.Target, "hello.txt")
	if err := step("NodeStage (attach loop, mkfs."+fsType+", mount) + NodePublish", func() error { return c.StageAndPublish(ctx, v) }); err != nil {
		return err
	}
	if err := step("write "+file, func() error { return csiclient.WriteFile(file, msg) }); err != nil {
		return err
	}
	if err := step("NodeUnpublish + NodeUnstage (detach loop)", func() error { return c.UnpublishAndUnstage(ctx, v) }); err != nil {
		return err
	}
	if err := step("NodeStage + NodePublish again", func() error { return c.StageAndPublish(ctx, v) }); err != nil {
		return err
	}
	if err := step("read back and compare", func() error {
		got, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, msg) {
			return fmt.Errorf("read %q, wrote %q", got, msg)
		}
		return nil
	}); err != nil {
		return err
	}
	if err := step("NodeGetVolumeStats", func() error {
		st, err := c.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.ID, VolumePath: v.Target})
		if err == nil {
			u := st.GetUsage()[0]
			fmt.Printf("  %d of %d bytes used\n", u.GetUsed(), u.GetTotal())
		}
		return err
	}); err != nil {
		return err
	}
	if err := step("NodeGetVolumeHealth", func() error {
		h, err := c.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: v.ID, VolumePublishPath: v.Target, StagingTargetPath: v.Staging})
		if err == nil && len(h.GetVolumeHealth().GetHealthStatuses()) > 0 {
			return fmt.Errorf("volume reported unhealthy: %v", h.GetVolumeHealth().GetHealthStatuses())
		}
		return err
	}); err != nil {
		return err
	}
	if err := step("NodeUnpublish + NodeUnstage", func() error { return c.UnpublishAndUnstage(ctx, v) }); err != nil {
		return err
	}
	if err := step("ControllerUnpublish + DeleteVolume", func() error { return c.Delete(ctx, v, node) }); err != nil {
		return err
	}
	fmt.Println("walk complete: the bytes written before unstaging were read back after staging again")
	return nil
}
