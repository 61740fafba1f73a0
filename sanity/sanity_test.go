// Package sanity runs csi-sanity against the real driver, in-process, with
// real loop devices, filesystems and mounts.
package sanity

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
	"github.com/spool-csi/spool/test/leakcheck"
)

func TestSanity(t *testing.T) {
	leakcheck.RequireRoot(t)
	dir := t.TempDir()
	leakcheck.Check(t, dir)

	sock := filepath.Join(dir, "csi.sock")
	_, stop, err := csiclient.Start(driver.Options{
		Endpoint:          "unix://" + sock,
		NodeID:            "sanity-node",
		Pools:             []pool.Spec{{Name: "default", Dir: filepath.Join(dir, "pool")}},
		MaxVolumesPerNode: 16,
		Version:           "test",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("driver: %v", err)
		}
	})

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	// Small volumes keep mkfs fast; thin images cost no space anyway.
	cfg.TestVolumeSize = 64 << 20
	cfg.IdempotentCount = 3
	cfg.TestNodeVolumeAttachLimit = true
	cfg.TestVolumeMutableParameters = map[string]string{"provisioning": "thick"}
	sanity.Test(t, cfg)
}
