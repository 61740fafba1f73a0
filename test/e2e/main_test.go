//go:build e2e

// Package e2e proves Spool's flows against a real Kubernetes: a single-node
// cluster started on this machine (test/e2e/cluster), the real CSI sidecars,
// and pods that write and read data. Run it with `make e2e` (root).
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

var (
	binDir      = flag.String("e2e.bin", os.Getenv("E2E_BIN"), "directory of the cluster binaries (hack/e2e-tools.sh)")
	crdDir      = flag.String("e2e.crds", os.Getenv("E2E_CRDS"), "directory of the snapshot CRDs")
	cbtCRDDir   = flag.String("e2e.cbt-crds", os.Getenv("E2E_CBT_CRDS"), "directory of the SnapshotMetadataService CRD (changed block tracking, scenario 13)")
	repoRoot    = flag.String("e2e.repo", "../..", "the repository root (bin/spool, deploy/)")
	kubeletRoot = flag.String("e2e.kubelet-root", "/var/lib/kubelet", "kubelet's root directory")
	keepLogs    = flag.String("e2e.logs", "", "copy the cluster's logs here when a test fails")
	deployDir   = flag.String("e2e.deploy", "", "kustomize base with the CSIDriver, RBAC and classes (default <repo>/deploy/base)")
	flavour     = flag.String("e2e.flavour", "", "run Spool in the cluster from deploy/<flavour> (single-node, local, shared) instead of as host processes")
	poolSize    = flag.String("e2e.pool-capacity", "3Gi", "capacity of the test pool")
)

// env is the cluster and driver every scenario uses.
var env struct {
	c       *cluster.Cluster
	spool   *cluster.Spool
	poolDir string
	// sharedDir is the shared pool "shared" the host-process driver also
	// serves (scenario 11).
	sharedDir string
	spoolBin  string
	socket    string // the driver's socket on the host
	workDir   string
	started   time.Time
	startDur  time.Duration
}

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

func run(m *testing.M) (code int) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: needs root (loop devices, mounts, kubelet)")
		return 1
	}
	if *binDir == "" || *crdDir == "" || *cbtCRDDir == "" {
		fmt.Fprintln(os.Stderr, "e2e: -e2e.bin, -e2e.crds and -e2e.cbt-crds (or E2E_BIN, E2E_CRDS, E2E_CBT_CRDS) are required; run via make e2e")
		return 1
	}
	root, err := filepath.Abs(*repoRoot)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	work, err := os.MkdirTemp("", "spool-e2e.")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	env.workDir = work
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "e2e %s: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
	}
	env.started = time.Now()
	c, err := cluster.Start(ctx, cluster.Config{BinDir: *binDir, WorkDir: work, KubeletRoot: *kubeletRoot, Logf: logf})
	if err != nil {
		logf("cluster start failed: %v", err)
		saveLogs(work, logf)
		_ = os.RemoveAll(work)
		return 1
	}
	env.c = c
	defer func() {
		if code != 0 {
			saveLogs(work, logf)
		}
		if err := c.Stop(context.Background()); err != nil {
			logf("teardown: %v", err)
			code = 1
		}
		if err := os.RemoveAll(work); err != nil {
			logf("remove %s: %v", work, err)
			code = 1
		}
	}()

	env.spoolBin = filepath.Join(root, "bin", "spool")
	if *flavour != "" {
		teardown, err := setupFlavour(ctx, root, logf)
		if err != nil {
			logf("deploy %s: %v", *flavour, err)
			// What the failed deploy made (the share of deploy/shared, the
			// snapshot controller, the applied flavour) goes, or the next
			// run finds it and refuses to start.
			if teardown != nil {
				if terr := teardown(); terr != nil {
					logf("remove %s after the failed deploy: %v", *flavour, terr)
				}
			}
			return 1
		}
		defer func() {
			if err := teardown(); err != nil {
				logf("remove %s: %v", *flavour, err)
				code = 1
			}
		}()
		return m.Run()
	}
	env.poolDir = filepath.Join(work, "pool")
	if err := os.MkdirAll(env.poolDir, 0o755); err != nil {
		logf("%v", err)
		return 1
	}
	// A shared pool too (scenario 11), made as an operator would.
	env.sharedDir = filepath.Join(work, "shared")
	if out, err := exec.CommandContext(ctx, env.spoolBin, "pool", "init", "shared="+env.sharedDir).CombinedOutput(); err != nil {
		logf("spool pool init: %v: %s", err, out)
		return 1
	}
	s, err := c.StartSpool(ctx, cluster.SpoolConfig{
		Binary:     env.spoolBin,
		DeployDir:  deployBase(root),
		CRDDir:     *crdDir,
		PoolDir:    env.poolDir,
		PoolArgs:   []string{"capacity=" + *poolSize},
		ExtraPools: []string{"shared=" + env.sharedDir + ",shared"},
		// Changed block tracking (scenario 13).
		SnapshotMetadataDir: filepath.Join(root, "deploy", "snapshot-metadata"),
		CBTCRDDir:           *cbtCRDDir,
	})
	if err != nil {
		logf("spool start failed: %v", err)
		return 1
	}
	env.spool = s
	env.socket = s.Socket
	env.startDur = time.Since(env.started)
	logf("cluster and spool ready in %.1fs", env.startDur.Seconds())
	defer func() {
		if err := checkNothingLeft(ctx); err != nil {
			logf("after the scenarios: %v", err)
			code = 1
		}
		if err := s.Stop(context.Background()); err != nil {
			logf("stop spool: %v", err)
			code = 1
		}
		for _, dir := range []string{env.poolDir, env.sharedDir} {
			if err := forceDetachLoops(dir); err != nil {
				logf("%v", err)
				code = 1
			}
		}
	}()
	return m.Run()
}

// saveLogs copies the cluster's logs where -e2e.logs says.
func saveLogs(work string, logf func(string, ...any)) {
	if *keepLogs == "" {
		return
	}
	dst := filepath.Join(*keepLogs, time.Now().Format("20060102-150405"))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		logf("save logs: %v", err)
		return
	}
	entries, _ := os.ReadDir(filepath.Join(work, "logs"))
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(work, "logs", e.Name()))
		if err == nil {
			_ = os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644)
		}
	}
	logf("logs saved in %s", dst)
}

func deployBase(root string) string {
	if *deployDir != "" {
		return *deployDir
	}
	return filepath.Join(root, "deploy", "base")
}
