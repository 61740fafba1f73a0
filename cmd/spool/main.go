// Command spool is the Spool CSI driver: one binary for the identity,
// controller and node services. `spool volume ...` runs the operator
// commands of pkg/cli instead of the server.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/cli"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/version"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "volume" {
		os.Exit(cli.Volume(os.Args[2:], os.Stdout, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == "pool" {
		os.Exit(cli.Pool(os.Args[2:], os.Stdout, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == "doctor" {
		os.Exit(cli.Doctor(os.Args[2:], os.Stdout, os.Stderr))
	}
	klog.InitFlags(nil)
	var (
		opts        driver.Options
		pools       pool.Specs
		mode        string
		showVersion bool
	)
	flag.StringVar(&opts.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint, unix:///path/to/csi.sock")
	flag.StringVar(&opts.NodeID, "node-id", "", "ID of this node (the Kubernetes node name)")
	flag.Var(&pools, "pool", "pool NAME=DIR[,capacity=SIZE][,shared[,id=POOLID]]; repeat for more pools; the first is the default")
	flag.StringVar(&mode, "mode", string(driver.ModeAll), "services to serve: all, controller or node")
	flag.StringVar(&opts.DriverName, "driver-name", driver.DefaultDriverName, "CSI driver name")
	flag.Int64Var(&opts.MaxVolumesPerNode, "max-volumes-per-node", 0, "volumes that may be attached to one node (0: no limit)")
	flag.Var(sizeFlag{&opts.Ephemeral.MaxSize}, "ephemeral-max-size", "largest size a pod spec may ask of an ephemeral inline volume (default 1Gi)")
	flag.Var(listFlag{&opts.Ephemeral.Pools}, "ephemeral-pools", "comma-separated pools ephemeral inline volumes may use (default: the first pool)")
	flag.BoolVar(&opts.Ephemeral.AllowThick, "ephemeral-allow-thick", false, "let a pod spec ask for provisioning: thick in an ephemeral inline volume")
	flag.DurationVar(&opts.MaxFreeze, "max-freeze", driver.DefaultMaxFreeze, "longest a volume's filesystem stays frozen for a snapshot or clone; a longer copy is given up")
	flag.StringVar(&opts.MetricsAddress, "metrics-address", "", "serve Prometheus metrics at http://ADDRESS/metrics (host:port, e.g. :9808); empty: off")
	flag.BoolVar(&showVersion, "version", false, "print the version and exit")
	flag.Usage = func() {
		fmt.Fprint(flag.CommandLine.Output(), "Usage: spool [flags]                      serve the CSI services\n"+
			"       spool volume create|list|delete   work on pools no driver serves (spool volume -h)\n"+
			"       spool pool init NAME=DIR          initialise a shared pool (spool pool -h)\n"+
			"       spool doctor --pool NAME=DIR      check that this node has what Spool needs (spool doctor -h)\n\nFlags:\n")
		flag.PrintDefaults()
	}
	flag.Parse()

	opts.Version = version.Get()
	if showVersion {
		fmt.Println(opts.Version)
		return
	}
	opts.Mode = driver.Mode(mode)
	opts.Pools = pools
	if err := run(opts); err != nil {
		klog.ErrorS(err, "spool failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(opts driver.Options) error {
	d, err := driver.New(opts, driver.RealKernel())
	if err != nil {
		return err
	}
	defer d.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return d.Run(ctx)
}

// sizeFlag is a flag holding a size such as 1Gi.
type sizeFlag struct{ n *int64 }

func (f sizeFlag) String() string {
	if f.n == nil || *f.n == 0 {
		return ""
	}
	return size.Format(*f.n)
}

func (f sizeFlag) Set(s string) error {
	n, err := size.Parse(s)
	if err != nil {
		return err
	}
	*f.n = n
	return nil
}

// listFlag is a flag holding a comma-separated list.
type listFlag struct{ l *[]string }

func (f listFlag) String() string {
	if f.l == nil {
		return ""
	}
	return strings.Join(*f.l, ",")
}

func (f listFlag) Set(s string) error {
	*f.l = nil
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			*f.l = append(*f.l, e)
		}
	}
	return nil
}
