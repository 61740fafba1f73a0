// Command spool-cbt-lister lists the allocated blocks of a VolumeSnapshot,
// or the blocks changed since an earlier one, through the
// csi-snapshot-metadata sidecar, as a backup application does. All the
// work is upstream's client library (external-snapshot-metadata
// pkg/iterator, the library of its snapshot-metadata-lister, whose main
// package the Go module proxy does not serve): it finds the driver's
// SnapshotMetadataService, makes a token for the ServiceAccount with the
// service's audience (TokenRequest), connects with the service's CA, and
// streams the metadata. This command only parses flags and prints the
// stream as upstream's JSON emitter does.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	var args iterator.Args
	var kubeconfig string
	var maxResults int
	flag.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the client's identity (required)")
	flag.StringVar(&args.Namespace, "n", "", "namespace of the VolumeSnapshots")
	flag.StringVar(&args.SnapshotName, "s", "", "the VolumeSnapshot to describe")
	flag.StringVar(&args.PrevSnapshotName, "p", "", "an earlier VolumeSnapshot: list the blocks changed since it")
	flag.StringVar(&args.SAName, "service-account", "", "ServiceAccount whose token is sent to the sidecar")
	flag.StringVar(&args.SANamespace, "service-account-namespace", "", "its namespace")
	flag.Int64Var(&args.StartingOffset, "starting-offset", 0, "byte offset to start from")
	flag.IntVar(&maxResults, "max-results", 0, "ranges per message (0: the driver decides)")
	flag.Parse()
	if kubeconfig == "" || args.Namespace == "" || args.SnapshotName == "" {
		fmt.Fprintln(os.Stderr, "usage: spool-cbt-lister -kubeconfig FILE -n NAMESPACE -s SNAPSHOT [-p PREVIOUS] [-service-account NAME -service-account-namespace NS]")
		os.Exit(2)
	}
	args.MaxResults = int32(maxResults)
	args.Emitter = &iterator.JSONEmitter{Writer: os.Stdout}
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "loading %s: %v\n", kubeconfig, err)
		os.Exit(1)
	}
	if args.Clients, err = iterator.BuildClients(config); err != nil {
		fmt.Fprintf(os.Stderr, "creating clients: %v\n", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := iterator.GetSnapshotMetadata(ctx, args); err != nil {
		fmt.Fprintf(os.Stderr, "Error: %v\n", err)
		os.Exit(1)
	}
}
