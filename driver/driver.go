// Package driver implements the CSI identity, controller and node services.
// Handlers are thin: they validate the request, take the per-volume lock and
// call into pkg/pool (the pool directory), pkg/loop (loop devices) and
// pkg/fs (filesystems and mounts).
package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/keylock"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/metrics"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// Mode selects the services a process serves.
type Mode string

// Modes.
const (
	ModeAll        Mode = "all"
	ModeController Mode = "controller"
	ModeNode       Mode = "node"
)

// DefaultDriverName is the CSI driver name.
const DefaultDriverName = "spool.csi.dev"

// TopologyKey is the topology key a driver of this name reports in
// NodeGetInfo and puts on its volumes: its value is the node's ID.
func TopologyKey(driverName string) string { return driverName + "/node" }

// Options is the driver's whole configuration, parsed once in cmd/spool.
type Options struct {
	Endpoint          string
	NodeID            string
	DriverName        string
	Mode              Mode
	Pools             []pool.Spec
	MaxVolumesPerNode int64
	Version           string
	// MetricsAddress is the TCP address to serve Prometheus metrics on
	// (host:port); empty serves none.
	MetricsAddress string
	// Ephemeral limits what pod authors may ask of CSI ephemeral inline
	// volumes.
	Ephemeral EphemeralLimits
	// MaxFreeze bounds how long a volume's filesystem stays frozen for a
	// snapshot or clone; 0 means DefaultMaxFreeze.
	MaxFreeze time.Duration
}

// DefaultMaxFreeze is the default of Options.MaxFreeze: a pod's writes hang
// while its filesystem is frozen.
const DefaultMaxFreeze = time.Minute

// EphemeralLimits are the operator's limits on CSI ephemeral inline
// volumes. Their attributes come from the pod spec, which any pod author
// writes: without limits, one pod could fill the node's pool.
type EphemeralLimits struct {
	// MaxSize is the largest size attribute accepted; 0 means
	// DefaultEphemeralMaxSize.
	MaxSize int64
	// Pools are the pools ephemeral volumes may use; empty means the
	// first pool only.
	Pools []string
	// AllowThick lets the pod spec ask for provisioning: thick (every
	// byte allocated at once). Off by default.
	AllowThick bool
}

// DefaultEphemeralMaxSize is the default cap on an ephemeral volume's size:
// the default size of a volume.
const DefaultEphemeralMaxSize = DefaultVolumeSize

// Validate checks the options and fills in defaults.
func (o *Options) Validate() error { return o.validate(true) }

// validate checks the options; an unserved driver needs no endpoint.
func (o *Options) validate(served bool) error {
	var errs []error
	if o.DriverName == "" {
		o.DriverName = DefaultDriverName
	}
	if o.Mode == "" {
		o.Mode = ModeAll
	}
	switch o.Mode {
	case ModeAll, ModeController, ModeNode:
	default:
		errs = append(errs, fmt.Errorf("--mode %q: want all, controller or node", o.Mode))
	}
	if _, err := socketPath(o.Endpoint); err != nil && served {
		errs = append(errs, err)
	}
	if err := volid.ValidateNodeID(o.NodeID); err != nil {
		errs = append(errs, fmt.Errorf("--node-id: %w", err))
	}
	// A controller without pools is the attach controller of node-local
	// pools (attachonly.go); every other mode needs a pool.
	if len(o.Pools) == 0 && o.Mode != ModeController {
		errs = append(errs, errors.New("at least one --pool NAME=DIR is required (only --mode=controller runs without pools, as the attach controller of node-local pools)"))
	}
	seen := map[string]bool{}
	for _, p := range o.Pools {
		if seen[p.Name] {
			errs = append(errs, fmt.Errorf("pool %q is configured twice", p.Name))
		}
		seen[p.Name] = true
	}
	if o.MaxVolumesPerNode < 0 {
		errs = append(errs, errors.New("--max-volumes-per-node must not be negative"))
	}
	if o.MaxFreeze < 0 {
		errs = append(errs, errors.New("--max-freeze must not be negative"))
	}
	if o.MaxFreeze == 0 {
		o.MaxFreeze = DefaultMaxFreeze
	}
	if o.Ephemeral.MaxSize < 0 {
		errs = append(errs, errors.New("--ephemeral-max-size must not be negative"))
	}
	if o.Ephemeral.MaxSize == 0 {
		o.Ephemeral.MaxSize = DefaultEphemeralMaxSize
	}
	for _, name := range o.Ephemeral.Pools {
		if !seen[name] {
			errs = append(errs, fmt.Errorf("--ephemeral-pools: %q is not a configured pool", name))
		}
	}
	if len(o.Ephemeral.Pools) == 0 && len(o.Pools) > 0 {
		o.Ephemeral.Pools = []string{o.Pools[0].Name}
	}
	if o.Version == "" {
		errs = append(errs, errors.New("version must not be empty"))
	}
	if o.MetricsAddress != "" {
		if _, _, err := net.SplitHostPort(o.MetricsAddress); err != nil {
			errs = append(errs, fmt.Errorf("--metrics-address %q: want host:port, e.g. :9808 or 127.0.0.1:9808", o.MetricsAddress))
		}
	}
	return errors.Join(errs...)
}

func (o *Options) serves(m Mode) bool { return o.Mode == ModeAll || o.Mode == m }

// socketPath extracts the socket path of a unix:// endpoint. Spool listens
// on unix sockets only: the CSI socket carries secrets and must not be
// reachable from the network.
func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" {
		return "", fmt.Errorf("--endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	p := u.Path
	if p == "" {
		p = u.Opaque
	}
	if u.Host != "" || !filepath.IsAbs(p) {
		return "", fmt.Errorf("--endpoint %q: want an absolute socket path, unix:///path/to/csi.sock", endpoint)
	}
	return filepath.Clean(p), nil
}

// core is what the services of one process share: the options, the pools,
// the locks of volume IDs and the metrics.
type core struct {
	opts        Options
	pools       pools
	topologyKey string
	// volumeLocks serialises operations on one volume ID, across the
	// services: a busy ID answers Aborted.
	volumeLocks keylock.Set
	metrics     *metrics.Metrics
}

// Controller serves the CSI controller, group controller and snapshot
// metadata services. It
// works on pool files alone and has no kernel interface: its volumes'
// filesystems are mounted by node plugins, in other mount namespaces and
// usually on other nodes, and its container may open no loop device
// (deploy/shared runs it unprivileged).
type Controller struct {
	csi.UnimplementedControllerServer
	csi.UnimplementedGroupControllerServer
	csi.UnimplementedSnapshotMetadataServer
	*core
	// local is the node service of the same process (--mode=all, or the
	// operator commands with a kernel), nil in a controller-only process:
	// through it a snapshot or clone freezes a filesystem staged here, and
	// a delete refuses an image a loop device here still uses.
	local localNode
}

// localNode is what a controller asks of the node service of its own
// process.
type localNode interface {
	// freezeStaged freezes the filesystems of the volumes staged on this
	// node for a copy (see Node.freezeStaged).
	freezeStaged(ctx context.Context, p *pool.Pool, tokens []string) (context.Context, func() error, error)
	// ownDevice returns this node's loop device of a volume, or nil.
	ownDevice(p *pool.Pool, token string) (*loop.Device, error)
}

// Node serves the CSI node service: loop devices, filesystems and mounts.
type Node struct {
	csi.UnimplementedNodeServer
	*core
	kernel Kernel
	// loopOwner tags the loop devices this node plugin attaches, so that
	// two node plugins on one kernel (kind, a multi-node test cluster) never
	// take each other's devices for their own (loopOwner()).
	loopOwner string
	// attachMu serialises the attachments a node records itself at stage
	// (attach-only mode, attachonly.go), which live in node-local pools
	// only: it is never held across a shared pool's storage.
	attachMu sync.Mutex
	// fences are the attachments of staged volumes of shared pools.
	fences fences
}

// Driver is one spool process: the identity service, and the controller
// and node services its mode asks for (nil when not served), over one
// socket with one interceptor (logging without secrets, metrics, errors
// mapped to gRPC codes).
type Driver struct {
	csi.UnimplementedIdentityServer
	*core
	*Controller
	*Node

	server     *grpc.Server
	metricsLis net.Listener
}

// New opens the pools and builds the services opts.Mode asks for. kernel
// is used only by the node service (a controller-only process has none, see
// Controller).
func New(opts Options, kernel Kernel) (*Driver, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	return build(opts, kernel, false)
}

// NewOffline builds a controller-only driver whose handlers are called
// directly instead of over a socket: `spool volume` uses it to work on pools
// while no driver serves them, through the same code as the CO's calls. It
// opens the pools (taking their locks, so it fails while a driver serves
// them) and serves nothing. kernel may be zero; with a real one DeleteVolume
// also refuses images a loop device still uses.
func NewOffline(opts Options, kernel Kernel) (*Driver, error) {
	opts.Mode, opts.Endpoint, opts.MetricsAddress = ModeController, "", ""
	if err := opts.validate(false); err != nil {
		return nil, err
	}
	return build(opts, kernel, true)
}

// build opens the pools of validated options and builds the services: the
// controller when the mode serves it, the node service when the mode
// serves it; an offline controller (NewOffline) with a kernel gets a node
// service that serves nothing, for its checks.
func build(opts Options, kernel Kernel, offline bool) (*Driver, error) {
	c := &core{opts: opts, topologyKey: TopologyKey(opts.DriverName)}
	d := &Driver{core: c}
	var n *Node
	if opts.serves(ModeNode) || (offline && kernel.Loops != nil) {
		n = &Node{core: c, kernel: kernel, loopOwner: loopOwner(opts.NodeID)}
	}
	if opts.serves(ModeNode) {
		d.Node = n
	}
	if opts.serves(ModeController) {
		d.Controller = &Controller{core: c}
		if n != nil {
			d.Controller.local = n
		}
	}
	for _, spec := range opts.Pools {
		// A node plugin of a shared pool leaves cleanup to the controllers.
		spec.NodeOnly = spec.Shared && opts.Mode == ModeNode
		p, err := pool.Open(spec, opts.NodeID)
		if err != nil {
			d.Close()
			return nil, err
		}
		d.pools.add(p)
	}
	if opts.MetricsAddress != "" {
		var attached func() (int, error)
		if d.Node != nil {
			attached = d.Node.attachedLoops
		}
		d.metrics = metrics.New(d.pools.all(), attached)
	}
	if d.Node != nil {
		if err := d.Node.start(); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// gRPC server limits (Serve).
const (
	maxRequestBytes    = 1 << 20
	maxConcurrentCalls = 128
)

// loopOwner is the owner tag of a node's loop devices: a digest of the node
// ID, which is stable across restarts of the plugin and fits lo_file_name.
func loopOwner(nodeID string) string {
	sum := sha256.Sum256([]byte(nodeID))
	return "node-" + hex.EncodeToString(sum[:8])
}

// Close releases the pools.
func (d *Driver) Close() { d.pools.close() }

// Run serves on the endpoint until ctx is cancelled.
func (d *Driver) Run(ctx context.Context) error {
	lis, err := d.Listen()
	if err != nil {
		return err
	}
	return d.Serve(ctx, lis)
}

// Listen creates the endpoint's socket, and the metrics listener when
// metrics are on. Callers that must know the socket exists before they go
// on (tests, the demo) call it before Serve.
func (d *Driver) Listen() (net.Listener, error) {
	path, err := socketPath(d.opts.Endpoint)
	if err != nil {
		return nil, err
	}
	if d.opts.MetricsAddress != "" && d.metricsLis == nil {
		if d.metricsLis, err = net.Listen("tcp", d.opts.MetricsAddress); err != nil {
			return nil, fmt.Errorf("listening for metrics on %s: %w", d.opts.MetricsAddress, err)
		}
	}
	return listen(path)
}

// MetricsAddr is the address metrics are served on ("" when off), known
// after Listen.
func (d *Driver) MetricsAddr() string {
	if d.metricsLis == nil {
		return ""
	}
	return d.metricsLis.Addr().String()
}

// Serve serves the CSI services on lis until ctx is cancelled, then waits
// for running calls and removes the socket.
func (d *Driver) Serve(ctx context.Context, lis net.Listener) error {
	d.server = grpc.NewServer(grpc.UnaryInterceptor(d.intercept), grpc.StreamInterceptor(d.interceptStream),
		// CSI requests are small (the largest carry a few secrets and
		// parameters): a request beyond 1 MiB is refused unread, and a
		// caller cannot open streams without bound.
		grpc.MaxRecvMsgSize(maxRequestBytes),
		grpc.MaxConcurrentStreams(maxConcurrentCalls))
	csi.RegisterIdentityServer(d.server, d)
	if d.Controller != nil {
		csi.RegisterControllerServer(d.server, d.Controller)
		csi.RegisterGroupControllerServer(d.server, d.Controller)
		csi.RegisterSnapshotMetadataServer(d.server, d.Controller)
	}
	if d.Node != nil {
		csi.RegisterNodeServer(d.server, d.Node)
	} else if d.Controller != nil && d.attachOnly() {
		csi.RegisterNodeServer(d.server, resizerNode{})
	}
	klog.InfoS("Serving CSI", "driver", d.opts.DriverName, "version", d.opts.Version, "mode", d.opts.Mode,
		"endpoint", d.opts.Endpoint, "node", d.opts.NodeID, "pools", strings.Join(d.pools.names(), ","))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var metricsDone chan error // nil, never ready, when metrics are off
	if d.metricsLis != nil {
		metricsDone = make(chan error, 1)
		go func() { metricsDone <- d.metrics.Serve(ctx, d.metricsLis) }()
	}
	if d.Node != nil && d.pools.anyShared() {
		go d.Node.watchFences(ctx, fenceCheckInterval)
	}
	errc := make(chan error, 1)
	go func() { errc <- d.server.Serve(lis) }()
	var err error
	select {
	case <-ctx.Done():
		klog.InfoS("Shutting down: waiting for running calls")
		d.server.GracefulStop()
		<-errc
	case err = <-errc:
		err = fmt.Errorf("serving %s: %w", d.opts.Endpoint, err)
	case err = <-metricsDone:
		d.server.Stop()
		<-errc
		if err == nil {
			err = errors.New("metrics server stopped")
		}
		return err
	}
	cancel()
	if metricsDone != nil {
		err = errors.Join(err, <-metricsDone)
	}
	return err
}

// listen creates the socket readable and writable by its owner only. A
// stale socket from an earlier run is replaced; anything else at the path
// is left alone.
func listen(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	return lis, nil
}

// lockResolved resolves a volume ID to its pool and takes the volume's
// lock; the caller calls unlock when err is nil.
func (d *core) lockResolved(id string) (*pool.Pool, volid.ID, func(), error) {
	p, vid, err := d.pools.resolve(id, volid.KindVolume)
	if err != nil {
		return nil, vid, nil, err
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, vid, nil, err
	}
	return p, vid, unlock, nil
}

// lockVolume takes the volume's lock or returns an Aborted status.
func (d *core) lockVolume(id string) (func(), error) {
	if !d.volumeLocks.TryLock(id) {
		return nil, abortedf("an operation on volume %s is already in progress", id)
	}
	return func() { d.volumeLocks.Unlock(id) }, nil
}
