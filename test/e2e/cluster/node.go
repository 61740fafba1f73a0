package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// startContainerd writes containerd's configuration (root, state and socket
// under the work directory), starts it and imports the pause and busybox
// images.
func (c *Cluster) startContainerd(ctx context.Context) error {
	dir := filepath.Join(c.cfg.WorkDir, "containerd")
	cniConf := filepath.Join(c.cfg.WorkDir, "cni")
	for _, d := range []string{dir, cniConf} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	conflist, err := json.MarshalIndent(map[string]any{
		"cniVersion": "0.4.0",
		"name":       cniNetwork,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": cniBridge, "isGateway": true, "ipMasq": false,
				"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": podSubnet}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}}},
			},
			map[string]any{"type": "loopback"},
		},
	}, "", "  ")
	if err != nil {
		return fmt.Errorf("CNI config: %w", err)
	}
	if err := os.WriteFile(filepath.Join(cniConf, "10-spool-e2e.conflist"), conflist, 0o644); err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	// restrict_oom_score_adj: this machine's processes lack CAP_SYS_RESOURCE,
	// so runc cannot lower oom_score_adj below its own; without it every pod
	// fails to start.
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.containerd, PauseImageName, cniConf)
	cfgFile := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o644); err != nil {
		return fmt.Errorf("write containerd config: %w", err)
	}
	if _, err := c.start("containerd", nil, "containerd", "--config", cfgFile); err != nil {
		return err
	}
	if err := waitFor(ctx, "containerd", 30*time.Second, 100*time.Millisecond, func() error {
		if c.procs["containerd"].Exited() {
			return backoffStop(fmt.Errorf("containerd exited; see %s", c.procs["containerd"].Log))
		}
		_, err := run(ctx, "ctr", "--address", c.containerd, "version")
		return err
	}); err != nil {
		return err
	}

	pause, err := HostFile(c.Bin("pause"), "/pause", 0o755)
	if err != nil {
		return err
	}
	busybox, err := NewBusyboxImage(BusyboxImageName, c.cfg.Busybox, []string{"sh"})
	if err != nil {
		return err
	}
	return c.ImportImages(ctx, &Image{Name: PauseImageName, Entrypoint: []string{"/pause"}, Files: []File{pause}}, busybox)
}

// ImportImages writes each image as an OCI tarball and imports it into
// containerd's k8s.io namespace, where the CRI plugin finds it.
func (c *Cluster) ImportImages(ctx context.Context, images ...*Image) error {
	dir := filepath.Join(c.cfg.WorkDir, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	for _, img := range images {
		tarball := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(img.Name)+".tar")
		if err := img.WriteOCI(tarball); err != nil {
			return err
		}
		if _, err := run(ctx, "ctr", "--address", c.containerd, "-n", "k8s.io", "images", "import", tarball); err != nil {
			return fmt.Errorf("import image %s: %w", img.Name, err)
		}
	}
	return nil
}

// startKubelet makes kubelet's root directory a shared mount (the node
// plugin's mounts must propagate to pods), writes its configuration and
// starts it, then waits for the node to be Ready.
func (c *Cluster) startKubelet(ctx context.Context) error {
	root := c.cfg.KubeletRoot
	if err := os.MkdirAll(root, 0o750); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	// / is mounted private here. Bind the kubelet root onto itself and mark
	// it shared rather than changing / for the whole machine.
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s onto itself: %w", root, err)
	}
	c.host.BoundKubeletRoot = true
	if err := c.host.save(); err != nil {
		return err
	}
	if err := unix.Mount("", root, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", root, err)
	}
	p := c.pkiPath
	kc := filepath.Join(c.cfg.WorkDir, "kubelet.kubeconfig")
	if err := writeKubeconfig(kc, c.Server, p("ca.crt"), p("kubelet.crt"), p("kubelet.key"), ""); err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	healthz, err := freePort()
	if err != nil {
		return err
	}
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
port: %d
healthzBindAddress: 127.0.0.1
healthzPort: %d
readOnlyPort: 0
tlsCertFile: %s
tlsPrivateKeyFile: %s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
fileCheckFrequency: 5s
syncFrequency: 10s
`, c.NodeIP, port, healthz, p("kubelet-serving.crt"), p("kubelet-serving.key"), p("ca.crt"), c.containerd)
	cfgFile := filepath.Join(c.cfg.WorkDir, "kubelet.yaml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o644); err != nil {
		return fmt.Errorf("write kubelet config: %w", err)
	}
	if _, err := c.start("kubelet", nil, c.Bin("kubelet"), "--config="+cfgFile, "--kubeconfig="+kc,
		"--root-dir="+root, "--hostname-override="+c.NodeName, "--node-ip="+c.NodeIP, "--v=2"); err != nil {
		return err
	}
	return waitFor(ctx, "node "+c.NodeName+" Ready", 90*time.Second, 250*time.Millisecond, func() error {
		if c.procs["kubelet"].Exited() {
			return backoffStop(fmt.Errorf("kubelet exited; see %s", c.procs["kubelet"].Log))
		}
		out, err := c.Kubectl(ctx, "get", "node", c.NodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if out != "True" {
			return fmt.Errorf("node Ready=%q", out)
		}
		return nil
	})
}

// startKubeProxy runs kube-proxy in iptables mode, so that pods reach the
// API server through the kubernetes Service (10.0.0.1:443), as in-cluster
// clients such as the CSI sidecars do.
func (c *Cluster) startKubeProxy(ctx context.Context) error {
	p := c.pkiPath
	kc := filepath.Join(c.cfg.WorkDir, "kube-proxy.kubeconfig")
	if err := writeKubeconfig(kc, c.Server, p("ca.crt"), p("kube-proxy.crt"), p("kube-proxy.key"), ""); err != nil {
		return err
	}
	healthz, err := freePort()
	if err != nil {
		return err
	}
	metrics, err := freePort()
	if err != nil {
		return err
	}
	// conntrack limits 0: leave the host's conntrack sysctls alone.
	config := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %s}
mode: iptables
clusterCIDR: %s
hostnameOverride: %s
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
conntrack: {maxPerCore: 0, min: 0}
`, kc, podSubnet, c.NodeName, healthz, metrics)
	cfgFile := filepath.Join(c.cfg.WorkDir, "kube-proxy.yaml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o644); err != nil {
		return fmt.Errorf("write kube-proxy config: %w", err)
	}
	if _, err := c.start("kube-proxy", nil, c.Bin("kube-proxy"), "--config="+cfgFile, "--v=1"); err != nil {
		return err
	}
	// Ready once it has written the rules of the kubernetes Service.
	return waitFor(ctx, "kube-proxy rules for the kubernetes Service", 60*time.Second, 250*time.Millisecond, func() error {
		if c.procs["kube-proxy"].Exited() {
			return backoffStop(fmt.Errorf("kube-proxy exited; see %s", c.procs["kube-proxy"].Log))
		}
		out, err := run(ctx, "iptables-save", "-t", "nat")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "default/kubernetes:https") {
			return fmt.Errorf("no rule for default/kubernetes yet")
		}
		return nil
	})
}
