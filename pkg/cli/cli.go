// Package cli implements the operator subcommands of the spool binary:
// `spool volume create|list|delete` and `spool pool init`. The volume
// commands work directly on pool directories while no driver serves them,
// through the driver's own controller handlers (driver.NewOffline): a volume
// made here is made exactly as CreateVolume makes one, and the driver serves
// it like any other once it starts.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/version"
	"github.com/spool-csi/spool/pkg/volid"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

const volumeUsage = `Usage: spool volume COMMAND [flags]

Work on the volumes of a pool directory while no driver serves it (stop the
driver on the node first; it reads its pools when it starts).

Commands:
  create   create a volume and print a PersistentVolume manifest for it
  list     list the volumes of the pools
  delete   delete volumes by their handle

Run 'spool volume COMMAND -h' for the flags of a command.
`

// Volume runs `spool volume ARGS...` and returns the process exit code: 0 on
// success, 1 on an error, 2 on a usage error. Results go to stdout, errors
// and notes to stderr.
func Volume(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, volumeUsage)
		return exitUsage
	}
	var run func([]string, io.Writer, io.Writer) error
	switch args[0] {
	case "create":
		run = create
	case "list":
		run = list
	case "delete":
		run = deleteVolumes
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, volumeUsage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "spool volume: unknown command %q\n\n%s", args[0], volumeUsage)
		return exitUsage
	}
	err := run(args[1:], stdout, stderr)
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		if ue.error != nil { // nil: the flag package has said it already
			fmt.Fprintf(stderr, "spool volume %s: %v\nRun 'spool volume %s -h' for usage.\n", args[0], ue.error, args[0])
		}
		return exitUsage
	default:
		fmt.Fprintf(stderr, "spool volume %s: %v\n", args[0], err)
		return exitError
	}
}

// usageError is a mistake in the command line, found before anything on
// disk was looked at.
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// common are the flags every volume command takes: the same as the server's,
// so that an operator can copy them from the driver's command line.
type common struct {
	pools      pool.Specs
	nodeID     string
	driverName string
	endpoint   string
	verbosity  int
	// readOnly opens the pools only to read them: nothing is created or
	// cleaned up (list).
	readOnly bool
}

// controller is what the volume commands call: the driver's own handlers,
// in this process (the pools opened directly) or over the socket of the
// driver that serves them.
type controller interface {
	CreateVolume(context.Context, *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error)
	DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error)
	ListVolumes(context.Context, *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error)
	ControllerGetVolume(context.Context, *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error)
	Close()
}

// remote calls a running driver's controller service over its socket.
type remote struct {
	conn *grpc.ClientConn
	c    csi.ControllerClient
}

func (r remote) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	return r.c.CreateVolume(ctx, req)
}

func (r remote) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return r.c.DeleteVolume(ctx, req)
}

func (r remote) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	return r.c.ListVolumes(ctx, req)
}

func (r remote) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	return r.c.ControllerGetVolume(ctx, req)
}

func (r remote) Close() { _ = r.conn.Close() }

// local calls the driver's controller handlers in this process. Like the
// gRPC server's interceptor, it gives their errors gRPC codes
// (driver.ToStatus): this is the other edge of the driver.
type local struct{ d *driver.Driver }

func (l local) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	r, err := l.d.CreateVolume(ctx, req)
	return r, driver.ToStatus(err)
}

func (l local) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	r, err := l.d.DeleteVolume(ctx, req)
	return r, driver.ToStatus(err)
}

func (l local) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	r, err := l.d.ListVolumes(ctx, req)
	return r, driver.ToStatus(err)
}

func (l local) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	r, err := l.d.ControllerGetVolume(ctx, req)
	return r, driver.ToStatus(err)
}

func (l local) Close() { l.d.Close() }

func (c *common) register(fs *flag.FlagSet) {
	fs.Var(&c.pools, "pool", "pool NAME=DIR[,capacity=SIZE], as given to the driver; repeat for more pools; the first is the default (required)")
	fs.StringVar(&c.nodeID, "node-id", "", "the --node-id of the driver that serves the pools (required)")
	fs.StringVar(&c.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name, as given to the driver")
	fs.StringVar(&c.endpoint, "endpoint", "", "unix:///path/to/csi.sock of the running driver that serves the pools: go through it instead of opening the pools (which a serving driver holds locked)")
	fs.IntVar(&c.verbosity, "v", -1, "log verbosity (klog) on stderr; -1: errors only")
}

// parse parses args into fs, allowing positional arguments between the
// flags, and returns the positional arguments.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{}
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// CSI driver names: at most 63 bytes, alphanumerics, '-' and '.', starting
// and ending with an alphanumeric (CSI spec, GetPluginInfo).
var driverNameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$`)

// check validates the common flags.
func (c *common) check() error {
	if len(c.pools) == 0 {
		return usagef("--pool NAME=DIR is required")
	}
	seen := map[string]bool{}
	for _, p := range c.pools {
		if seen[p.Name] {
			return usagef("pool %q is given twice", p.Name)
		}
		seen[p.Name] = true
	}
	if c.nodeID == "" {
		return usagef("--node-id is required: the --node-id of the driver that serves the pools")
	}
	if err := volid.ValidateNodeID(c.nodeID); err != nil {
		return usagef("--node-id: %v", err)
	}
	if !driverNameRE.MatchString(c.driverName) {
		return usagef("--driver-name %q: want at most 63 letters, digits, '-' or '.', starting and ending with a letter or digit", c.driverName)
	}
	return nil
}

// open sets up logging and opens the pools, which must exist already, for
// direct calls of the controller handlers; or, with --endpoint, connects to
// the driver that serves them. The caller closes the controller.
func (c *common) open() (controller, error) {
	setupLogging(c.verbosity)
	if c.endpoint != "" {
		path, ok := strings.CutPrefix(c.endpoint, "unix://")
		if !ok || !filepath.IsAbs(path) {
			return nil, usagef("--endpoint %q: want unix:///absolute/path/to/csi.sock", c.endpoint)
		}
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("--endpoint: %w (is the driver running?)", err)
		}
		conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", c.endpoint, err)
		}
		return remote{conn: conn, c: csi.NewControllerClient(conn)}, nil
	}
	specs := make([]pool.Spec, len(c.pools))
	for i, s := range c.pools {
		s.Existing = true
		s.ReadOnly = c.readOnly
		specs[i] = s
	}
	d, err := driver.NewOffline(driver.Options{
		NodeID: c.nodeID, DriverName: c.driverName, Pools: specs, Version: version.Get(),
	}, driver.RealKernel())
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, fmt.Errorf("%w; a running driver serves it: pass its socket with --endpoint unix:///path/to/csi.sock, or stop it first", err)
	}
	if err != nil {
		return nil, err
	}
	return local{d}, nil
}

// checkNode refuses a --node-id that differs from the node named by the
// pools' existing volumes: the driver would never serve a volume made for
// another node. Volumes of shared pools name no node and say nothing.
func (c *common) checkNode(ctx context.Context, d controller) error {
	vols, err := listAll(ctx, d)
	if err != nil {
		return err
	}
	for _, e := range vols {
		id, err := volid.Parse(e.GetVolume().GetVolumeId())
		if err == nil && id.Node != "" && id.Node != c.nodeID {
			return fmt.Errorf("pool %s holds volumes of node %s (%s), not of --node-id %s: give the --node-id of the driver that serves the pool", id.Pool, id.Node, id, c.nodeID)
		}
	}
	return nil
}

// setupLogging sends klog to stderr at verbosity v, or (v < 0) keeps only
// errors.
func setupLogging(v int) {
	var kfs flag.FlagSet
	klog.InitFlags(&kfs)
	if v < 0 {
		_ = kfs.Set("logtostderr", "false")
		_ = kfs.Set("v", "0")
		klog.SetOutput(io.Discard) // errors still reach stderr (stderrthreshold)
		return
	}
	_ = kfs.Set("logtostderr", "true")
	_ = kfs.Set("v", strconv.Itoa(v))
}

// message is the text of an error from a handler, without the gRPC framing.
func message(err error) error {
	if st, ok := status.FromError(err); ok {
		return errors.New(st.Message())
	}
	return err
}

// oneOf checks a flag against its allowed values.
func oneOf(flagName, v string, allowed ...string) error {
	for _, a := range allowed {
		if v == a {
			return nil
		}
	}
	return usagef("--%s %q: want %s", flagName, v, strings.Join(allowed, ", "))
}
