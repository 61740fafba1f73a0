// Package cluster starts a real single-node Kubernetes cluster on this
// machine for Spool's end-to-end tests: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, containerd and kubelet as host
// processes, built from Go modules by hack/e2e-tools.sh, with images made
// locally (no registry, no container engine). Stop tears everything down
// again, including what kubelet and containerd leave on the host.
//
// The facts behind the choices here (cgroup v1, the oom_score_adj
// restriction, the node IP, mount propagation) are in
// ../shared/notes/k8s-local-cluster.md and test/e2e/README.md.
package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Config says where the binaries are and where the cluster lives.
type Config struct {
	BinDir      string // kube-apiserver, ..., kubectl, etcd, pause (hack/e2e-tools.sh)
	WorkDir     string // everything the cluster writes, except what kubelet needs elsewhere
	KubeletRoot string // kubelet's --root-dir; default /var/lib/kubelet
	NodeName    string // default: the host name, lower case
	Busybox     string // static busybox for the test image; default /bin/busybox
	Logf        func(format string, args ...any)
}

// Image names the cluster imports into containerd.
const (
	PauseImageName   = "registry.k8s.io/pause:3.10.2" // the tag the Kubernetes e2e suite names
	BusyboxImageName = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1"
	cniNetwork       = "spool-e2e"
	cniBridge        = "spool-e2e0"
	podSubnet        = "10.88.0.0/16"
)

// Cluster is a running test cluster.
type Cluster struct {
	cfg        Config
	NodeName   string
	NodeIP     string
	Server     string // https://127.0.0.1:port
	Kubeconfig string // cluster-admin
	CAFile     string
	pki        *pki
	logDir     string
	procs      map[string]*Proc
	containerd string // containerd socket
	host       *hostState
	started    time.Time
}

func (c *Cluster) logf(format string, args ...any) {
	if c.cfg.Logf != nil {
		c.cfg.Logf(format, args...)
	}
}

// LogDir holds one log file per process.
func (c *Cluster) LogDir() string { return c.logDir }

// ContainerdSocket is the CRI endpoint kubelet uses.
func (c *Cluster) ContainerdSocket() string { return c.containerd }

// KubeletRoot is kubelet's --root-dir.
func (c *Cluster) KubeletRoot() string { return c.cfg.KubeletRoot }

// Bin is the path of a binary in the cache.
func (c *Cluster) Bin(name string) string { return filepath.Join(c.cfg.BinDir, name) }

// Start brings the cluster up: on error, whatever was started is torn down.
func Start(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if cfg.KubeletRoot == "" {
		cfg.KubeletRoot = "/var/lib/kubelet"
	}
	if cfg.Busybox == "" {
		cfg.Busybox = "/bin/busybox"
	}
	if cfg.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("host name: %w", err)
		}
		cfg.NodeName = strings.ToLower(h)
	}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl", "pause"} {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, b)); err != nil {
			return nil, fmt.Errorf("%s is missing from %s (run hack/e2e-tools.sh): %w", b, cfg.BinDir, err)
		}
	}
	for _, b := range []string{"containerd", "ctr", "runc", "iptables-save", "iptables-restore"} {
		if _, err := exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("%s is not installed (apt-get install containerd runc iptables): %w", b, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return nil, fmt.Errorf("the CNI bridge plugin is not installed (apt-get install containernetworking-plugins): %w", err)
	}
	c = &Cluster{cfg: cfg, NodeName: cfg.NodeName, procs: map[string]*Proc{}, logDir: filepath.Join(cfg.WorkDir, "logs"), started: time.Now()}
	if c.NodeIP, err = nodeIP(); err != nil {
		return nil, err
	}
	for _, d := range []string{c.logDir, filepath.Join(cfg.WorkDir, "etcd")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := CleanStale(ctx, c.logf); err != nil {
		return nil, fmt.Errorf("clean up after an earlier run: %w", err)
	}
	c.containerd = filepath.Join(cfg.WorkDir, "containerd", "containerd.sock")
	if c.host, err = saveHostState(ctx, cfg.WorkDir, c.containerd, cfg.KubeletRoot); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if serr := c.Stop(context.Background()); serr != nil {
				c.logf("teardown after a failed start: %v", serr)
			}
			c = nil
		}
	}()
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"certificates", c.writePKI},
		{"etcd and control plane", c.startControlPlane},
		{"containerd and images", c.startContainerd},
		{"kubelet", c.startKubelet},
		{"kube-proxy", c.startKubeProxy},
	}
	for _, s := range steps {
		t0 := time.Now()
		if err := s.fn(ctx); err != nil {
			return c, fmt.Errorf("start %s: %w", s.name, err)
		}
		c.logf("cluster: %s up in %.1fs", s.name, time.Since(t0).Seconds())
	}
	return c, nil
}

// nodeIP is the source address of the default route: kubelet refuses a
// loopback --node-ip.
func nodeIP() (string, error) {
	conn, err := net.Dial("udp4", "192.0.2.254:9")
	if err == nil {
		defer conn.Close()
		if a, ok := conn.LocalAddr().(*net.UDPAddr); ok && !a.IP.IsLoopback() {
			return a.IP.String(), nil
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String(), nil
		}
	}
	return "", errors.New("no non-loopback IPv4 address for the node")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *Cluster) pkiPath(name string) string { return c.pki.path(name) }

func (c *Cluster) writePKI(context.Context) error {
	p, err := newPKI(filepath.Join(c.cfg.WorkDir, "pki"))
	if err != nil {
		return err
	}
	c.pki = p
	c.CAFile = p.path("ca.crt")
	host, _ := os.Hostname()
	hosts := []string{"127.0.0.1", c.NodeIP, "10.0.0.1", "localhost", host, "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	certs := []struct {
		name, cn string
		orgs     []string
		hosts    []string
	}{
		{"apiserver", "kube-apiserver", nil, hosts},
		{"admin", "spool-e2e-admin", []string{"system:masters"}, nil},
		{"controller-manager", "system:kube-controller-manager", nil, nil},
		{"scheduler", "system:kube-scheduler", nil, nil},
		{"kubelet", "system:node:" + c.NodeName, []string{"system:nodes"}, nil},
		{"kubelet-serving", c.NodeName, nil, []string{c.NodeName, c.NodeIP, "127.0.0.1"}},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil},
		{"kube-proxy", "system:kube-proxy", nil, nil},
	}
	for _, ct := range certs {
		if err := p.issue(ct.name, ct.cn, ct.orgs, ct.hosts); err != nil {
			return err
		}
	}
	return p.serviceAccountKey()
}

func (c *Cluster) start(name string, env []string, args ...string) (*Proc, error) {
	p, err := StartProc(name, c.logDir, env, args...)
	if err != nil {
		return nil, err
	}
	c.procs[name] = p
	return p, nil
}

func (c *Cluster) startControlPlane(ctx context.Context) error {
	etcdPort, err := freePort()
	if err != nil {
		return err
	}
	peerPort, err := freePort()
	if err != nil {
		return err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	if _, err := c.start("etcd", nil, c.Bin("etcd"),
		"--name=spool-e2e", "--data-dir="+filepath.Join(c.cfg.WorkDir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		fmt.Sprintf("--listen-peer-urls=http://127.0.0.1:%d", peerPort),
		fmt.Sprintf("--initial-advertise-peer-urls=http://127.0.0.1:%d", peerPort),
		fmt.Sprintf("--initial-cluster=spool-e2e=http://127.0.0.1:%d", peerPort),
		"--unsafe-no-fsync", "--log-level=warn"); err != nil {
		return err
	}
	if err := waitFor(ctx, "etcd", 30*time.Second, 100*time.Millisecond, func() error {
		resp, err := http.Get(etcdURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("etcd /health: %s", resp.Status)
		}
		return nil
	}); err != nil {
		return err
	}

	apiPort, err := freePort()
	if err != nil {
		return err
	}
	c.Server = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	p := c.pkiPath
	if _, err := c.start("kube-apiserver", nil, c.Bin("kube-apiserver"),
		"--etcd-servers="+etcdURL,
		// Pods reach the API server through the kubernetes Service, which
		// kube-proxy maps to the advertised address: the node's, not loopback.
		"--bind-address=0.0.0.0", fmt.Sprintf("--secure-port=%d", apiPort), "--advertise-address="+c.NodeIP,
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=Node,RBAC", "--allow-privileged=true",
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--v=1"); err != nil {
		return err
	}
	c.Kubeconfig = filepath.Join(c.cfg.WorkDir, "admin.kubeconfig")
	if err := writeKubeconfig(c.Kubeconfig, c.Server, p("ca.crt"), p("admin.crt"), p("admin.key"), ""); err != nil {
		return err
	}
	client, err := c.httpClient()
	if err != nil {
		return err
	}
	if err := waitFor(ctx, "kube-apiserver /readyz", 90*time.Second, 200*time.Millisecond, func() error {
		if c.procs["kube-apiserver"].Exited() {
			return backoffStop(fmt.Errorf("kube-apiserver exited; see %s", c.procs["kube-apiserver"].Log))
		}
		resp, err := client.Get(c.Server + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	}); err != nil {
		return err
	}

	for _, comp := range []struct{ name, cert string }{{"kube-controller-manager", "controller-manager"}, {"kube-scheduler", "scheduler"}} {
		kc := filepath.Join(c.cfg.WorkDir, comp.cert+".kubeconfig")
		if err := writeKubeconfig(kc, c.Server, p("ca.crt"), p(comp.cert+".crt"), p(comp.cert+".key"), ""); err != nil {
			return err
		}
		port, err := freePort()
		if err != nil {
			return err
		}
		args := []string{c.Bin(comp.name), "--kubeconfig=" + kc, "--authentication-kubeconfig=" + kc,
			"--authorization-kubeconfig=" + kc, "--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", port),
			"--leader-elect=false", "--v=1"}
		if comp.name == "kube-controller-manager" {
			args = append(args, "--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
				"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
				"--use-service-account-credentials", "--controllers=*,-bootstrapsigner,-tokencleaner")
		}
		if _, err := c.start(comp.name, nil, args...); err != nil {
			return err
		}
	}
	// The controller manager's ServiceAccount controller makes the default
	// ServiceAccount that pods need.
	return waitFor(ctx, "default ServiceAccount", 60*time.Second, 250*time.Millisecond, func() error {
		_, err := c.Kubectl(ctx, "get", "serviceaccount", "default", "-n", "default")
		return err
	})
}

// backoffStop marks an error that waiting longer cannot fix.
type stopWaiting struct{ error }

func backoffStop(err error) error { return stopWaiting{err} }

func (c *Cluster) httpClient() (*http.Client, error) {
	ca, err := os.ReadFile(c.pkiPath("ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("read CA: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(c.pkiPath("admin.crt"), c.pkiPath("admin.key"))
	if err != nil {
		return nil, fmt.Errorf("load admin certificate: %w", err)
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}}, nil
}

// Kubectl runs kubectl as cluster-admin and returns its standard output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	return c.KubectlIn(ctx, "", args...)
}

// KubectlIn runs kubectl with stdin as its standard input.
func (c *Cluster) KubectlIn(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.Bin("kubectl"), append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Apply applies a manifest.
func (c *Cluster) Apply(ctx context.Context, manifest string) error {
	_, err := c.KubectlIn(ctx, manifest, "apply", "-f", "-")
	return err
}
