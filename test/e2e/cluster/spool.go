package cluster

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DriverName is the CSI driver name deploy/base registers.
const DriverName = "spool.csi.dev"

// SpoolConfig says how to run Spool and its sidecars next to the cluster.
type SpoolConfig struct {
	Binary    string   // bin/spool
	DeployDir string   // deploy/base: CSIDriver, ServiceAccounts, RBAC, classes
	CRDDir    string   // the snapshot CRDs
	PoolDir   string   // the pool directory
	PoolArgs  []string // extra ",key=value" options of --pool, e.g. "capacity=2Gi"
	// ExtraPools are more --pool values, e.g. "shared=/dir,shared".
	ExtraPools []string
	Namespace  string // where deploy/base puts the ServiceAccounts
	// SnapshotMetadataDir is deploy/snapshot-metadata and CBTCRDDir the
	// SnapshotMetadataService CRD: with both, the csi-snapshot-metadata
	// sidecar runs too (StartSnapshotMetadata).
	SnapshotMetadataDir, CBTCRDDir string
}

// sidecar is one CSI sidecar run as a host process with the identity of its
// ServiceAccount from deploy/base, so the RBAC rules there are what it gets.
type sidecar struct {
	name, serviceAccount string
	args                 []string
	env                  []string
}

// Spool is the driver, its registrar and sidecars running on the node.
type Spool struct {
	c      *Cluster
	cfg    SpoolConfig
	Socket string
	// SnapshotMetadataAddress is where the csi-snapshot-metadata sidecar
	// serves (host:port), when it runs.
	SnapshotMetadataAddress string
	Driver                  *Proc
	procs                   []*Proc
	nodeArgs                []string
}

// StartSpool applies deploy/base and the snapshot CRDs, then starts the
// snapshot controller, Spool (all mode), the plugin registrar and the
// sidecars, and waits until kubelet has registered the driver.
func (c *Cluster) StartSpool(ctx context.Context, cfg SpoolConfig) (s *Spool, err error) {
	if cfg.Namespace == "" {
		cfg.Namespace = "spool-system"
	}
	s = &Spool{c: c, cfg: cfg, Socket: filepath.Join(c.cfg.KubeletRoot, "plugins", DriverName, "csi.sock")}
	defer func() {
		if err != nil {
			if serr := s.Stop(context.Background()); serr != nil {
				c.logf("stop spool after a failed start: %v", serr)
			}
			s = nil
		}
	}()
	t0 := time.Now()
	snapCtl, err := c.InstallSnapshots(ctx, cfg.CRDDir)
	if err != nil {
		return s, err
	}
	s.procs = append(s.procs, snapCtl)
	if _, err := c.Kubectl(ctx, "apply", "-k", cfg.DeployDir); err != nil {
		return s, fmt.Errorf("apply %s: %w", cfg.DeployDir, err)
	}

	if err := os.MkdirAll(filepath.Dir(s.Socket), 0o750); err != nil {
		return s, fmt.Errorf("create the socket directory: %w", err)
	}
	pool := "default=" + cfg.PoolDir
	for _, a := range cfg.PoolArgs {
		pool += "," + a
	}
	s.nodeArgs = []string{cfg.Binary, "--endpoint=unix://" + s.Socket, "--node-id=" + c.NodeName,
		"--pool=" + pool, "--mode=all", "--v=4"}
	for _, p := range cfg.ExtraPools {
		s.nodeArgs = append(s.nodeArgs, "--pool="+p)
	}
	if err := s.StartDriver(ctx); err != nil {
		return s, err
	}
	reg, err := Supervise("spool-registrar", c.logDir, nil, c.Bin("spool-registrar"),
		"--csi-address="+s.Socket, "--kubelet-registration-path="+s.Socket,
		"--plugin-registration-path="+filepath.Join(c.cfg.KubeletRoot, "plugins_registry"))
	if err != nil {
		return s, err
	}
	s.procs = append(s.procs, reg)

	common := []string{"--csi-address=" + s.Socket, "--timeout=60s", "--v=4"}
	leader := []string{"--leader-election=true", "--leader-election-namespace=" + cfg.Namespace}
	sidecars := []sidecar{
		{name: "csi-provisioner", serviceAccount: "spool-csi-provisioner",
			args: []string{"--node-deployment", "--enable-capacity", "--capacity-ownerref-level=-1",
				"--capacity-poll-interval=5s", "--kube-api-capacity-qps=20", "--kube-api-capacity-burst=40",
				"--extra-create-metadata", "--leader-election=false",
				"--node-deployment-base-delay=1s"},
			env: []string{"NODE_NAME=" + c.NodeName, "NAMESPACE=" + cfg.Namespace}},
		{name: "csi-attacher", serviceAccount: "spool-csi-attacher", args: leader},
		{name: "csi-resizer", serviceAccount: "spool-csi-resizer", args: append([]string{"--handle-volume-inuse-error=false"}, leader...)},
		{name: "csi-snapshotter", serviceAccount: "spool-csi-snapshotter", args: append([]string{"--extra-create-metadata"}, leader...)},
	}
	for _, sc := range sidecars {
		kc, err := c.ServiceAccountKubeconfig(ctx, cfg.Namespace, sc.serviceAccount)
		if err != nil {
			return s, err
		}
		args := append([]string{c.Bin(sc.name), "--kubeconfig=" + kc}, common...)
		p, err := Supervise(sc.name, c.logDir, sc.env, append(args, sc.args...)...)
		if err != nil {
			return s, err
		}
		s.procs = append(s.procs, p)
	}
	if cfg.SnapshotMetadataDir != "" && cfg.CBTCRDDir != "" {
		if err := s.startSnapshotMetadata(ctx); err != nil {
			return s, err
		}
	}
	if err := waitFor(ctx, "kubelet registers "+DriverName, 60*time.Second, 250*time.Millisecond, func() error {
		out, err := c.Kubectl(ctx, "get", "csinode", c.NodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		if err != nil {
			return err
		}
		if !strings.Contains(out, DriverName) {
			return fmt.Errorf("CSINode drivers: %q", out)
		}
		return nil
	}); err != nil {
		return s, err
	}
	c.logf("spool: driver, registrar and sidecars up in %.1fs", time.Since(t0).Seconds())
	return s, nil
}

// SnapshotMetadataAudience is the audience of the SnapshotMetadataService
// the harness creates: a backup client's token must carry it.
const SnapshotMetadataAudience = "spool-e2e-backup"

// startSnapshotMetadata runs changed block tracking as deploy/snapshot-metadata
// does, with the sidecar as a host process: the SnapshotMetadataService CRD,
// the sidecar's and the backup clients' RBAC from deploy/snapshot-metadata,
// a serving certificate from the cluster's CA for 127.0.0.1, the
// SnapshotMetadataService object named after the driver, and the sidecar,
// with the identity of spool-csi-provisioner (the account of the pods it
// runs in) on Spool's socket. It waits until the sidecar's /health says it
// serves, which it does only once Spool has said it serves the service.
func (s *Spool) startSnapshotMetadata(ctx context.Context) error {
	c := s.c
	dir, err := filepath.EvalSymlinks(s.cfg.CBTCRDDir)
	if err != nil {
		return fmt.Errorf("SnapshotMetadataService CRD: %w", err)
	}
	if _, err := c.Kubectl(ctx, "apply", "--server-side", "-f", dir); err != nil {
		return fmt.Errorf("apply the SnapshotMetadataService CRD: %w", err)
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Established", "--timeout=60s", "-f", dir); err != nil {
		return fmt.Errorf("SnapshotMetadataService CRD: %w", err)
	}
	for _, f := range []string{"rbac.yaml", "client-rbac.yaml"} {
		if _, err := c.Kubectl(ctx, "apply", "-f", filepath.Join(s.cfg.SnapshotMetadataDir, f)); err != nil {
			return fmt.Errorf("apply %s: %w", f, err)
		}
	}
	if err := c.pki.issue("snapshot-metadata", "csi-snapshot-metadata", nil, []string{"127.0.0.1"}); err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	health, err := freePort()
	if err != nil {
		return err
	}
	ca, err := os.ReadFile(c.CAFile)
	if err != nil {
		return fmt.Errorf("cluster CA: %w", err)
	}
	s.SnapshotMetadataAddress = fmt.Sprintf("127.0.0.1:%d", port)
	sms := fmt.Sprintf(`apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata: {name: %s}
spec:
  address: %q
  audience: %s
  caCert: %s
`, DriverName, s.SnapshotMetadataAddress, SnapshotMetadataAudience, base64.StdEncoding.EncodeToString(ca))
	if _, err := c.KubectlIn(ctx, sms, "apply", "-f", "-"); err != nil {
		return fmt.Errorf("create the SnapshotMetadataService: %w", err)
	}
	kc, err := c.ServiceAccountKubeconfig(ctx, s.cfg.Namespace, "spool-csi-provisioner")
	if err != nil {
		return err
	}
	p, err := Supervise("csi-snapshot-metadata", c.logDir, nil, c.Bin("csi-snapshot-metadata"),
		"--kubeconfig="+kc, "--csi-address="+s.Socket, "--timeout=60s", "--v=4",
		"--tls-cert="+c.pki.path("snapshot-metadata.crt"), "--tls-key="+c.pki.path("snapshot-metadata.key"),
		fmt.Sprintf("--port=%d", port), fmt.Sprintf("--http-endpoint=127.0.0.1:%d", health))
	if err != nil {
		return err
	}
	s.procs = append(s.procs, p)
	url := fmt.Sprintf("http://127.0.0.1:%d/health", health)
	return waitFor(ctx, "csi-snapshot-metadata serving", 60*time.Second, 250*time.Millisecond, func() error {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	})
}

// InstallSnapshots applies the snapshot CRDs and starts the snapshot
// controller (a cluster component, not part of Spool) with extra flags.
func (c *Cluster) InstallSnapshots(ctx context.Context, crdDir string, flags ...string) (*Proc, error) {
	// kubectl does not follow a symlink to a directory.
	dir, err := filepath.EvalSymlinks(crdDir)
	if err != nil {
		return nil, fmt.Errorf("snapshot CRDs: %w", err)
	}
	if _, err := c.Kubectl(ctx, "apply", "--server-side", "-f", dir); err != nil {
		return nil, fmt.Errorf("apply snapshot CRDs: %w", err)
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Established", "--timeout=60s", "-f", dir); err != nil {
		return nil, fmt.Errorf("snapshot CRDs: %w", err)
	}
	args := append([]string{c.Bin("snapshot-controller"), "--kubeconfig=" + c.Kubeconfig, "--leader-election=false", "--v=2"}, flags...)
	return Supervise("snapshot-controller", c.logDir, nil, args...)
}

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as the
// ServiceAccount with a token from the TokenRequest API.
func (c *Cluster) ServiceAccountKubeconfig(ctx context.Context, namespace, name string) (string, error) {
	token, err := c.Kubectl(ctx, "create", "token", name, "-n", namespace, "--duration=24h")
	if err != nil {
		return "", fmt.Errorf("token for ServiceAccount %s/%s (is it in deploy/base?): %w", namespace, name, err)
	}
	path := filepath.Join(c.cfg.WorkDir, "sa-"+name+".kubeconfig")
	return path, writeKubeconfig(path, c.Server, c.CAFile, "", "", strings.TrimSpace(token))
}

// StartDriver starts bin/spool and waits until it serves.
func (s *Spool) StartDriver(ctx context.Context) error {
	p, err := StartProc("spool", s.c.logDir, nil, s.nodeArgs...)
	if err != nil {
		return err
	}
	s.Driver = p
	return waitFor(ctx, "spool serving", 30*time.Second, 100*time.Millisecond, func() error {
		if p.Exited() {
			return backoffStop(fmt.Errorf("spool exited; see %s", p.Log))
		}
		b, err := os.ReadFile(p.Log)
		if err != nil {
			return err
		}
		// The log of a restarted driver holds the earlier instance's lines:
		// look at what follows the last start marker.
		text := string(b)
		if i := strings.LastIndex(text, "=== "); i >= 0 {
			text = text[i:]
		}
		if !strings.Contains(text, `"Serving CSI"`) {
			return errors.New("no \"Serving CSI\" line yet")
		}
		return nil
	})
}

// KillDriver ends the driver with SIGKILL, as a crash would.
func (s *Spool) KillDriver() error { return s.Driver.Kill() }

// SidecarRestarts sums the restarts of the supervised processes.
func (s *Spool) SidecarRestarts() int {
	n := 0
	for _, p := range s.procs {
		n += p.Restarts()
	}
	return n
}

// Stop stops the sidecars, the registrar and the driver.
func (s *Spool) Stop(context.Context) error {
	var errs []error
	for i := len(s.procs) - 1; i >= 0; i-- {
		if err := s.procs[i].Stop(15 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Driver != nil {
		if err := s.Driver.Stop(30 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
