// Package sanity runs csi-sanity against the real driver, in-process, with
// real loop devices, filesystems and mounts.
package sanity

import (
	"bytes"
	"os"
	"os/exec"
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
	runSanity(t, dir, pool.Spec{Name: "default", Dir: filepath.Join(dir, "pool")})
}

// TestSanitySharedPool runs the same specs against a shared pool: volumes
// that belong to no node, attachments checked under the pool's locks.
func TestSanitySharedPool(t *testing.T) {
	leakcheck.RequireRoot(t)
	if os.Getenv(sharedChild) == "" {
		// ginkgo runs one suite per process: run this one in a child.
		cmd := exec.Command(os.Args[0], "-test.run=^TestSanitySharedPool$", "-test.count=1")
		cmd.Env = append(os.Environ(), sharedChild+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("csi-sanity against a shared pool: %v\n%s", err, out)
		}
		if !bytes.Contains(out, []byte("SUCCESS!")) {
			t.Fatalf("csi-sanity against a shared pool ran no specs:\n%s", out)
		}
		return
	}
	dir := t.TempDir()
	leakcheck.Check(t, dir)
	share := filepath.Join(dir, "share")
	id, err := pool.Init("shared", share)
	if err != nil {
		t.Fatal(err)
	}
	runSanity(t, dir, pool.Spec{Name: "shared", Dir: share, Shared: true, ID: id})
}

// sharedChild marks the child process that runs the shared pool's specs.
const sharedChild = "SPOOL_SANITY_SHARED_CHILD"

func runSanity(t *testing.T, dir string, spec pool.Spec) {
	sock := filepath.Join(dir, "csi.sock")
	_, stop, err := csiclient.Start(driver.Options{
		Endpoint:          "unix://" + sock,
		NodeID:            "sanity-node",
		Pools:             []pool.Spec{spec},
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
