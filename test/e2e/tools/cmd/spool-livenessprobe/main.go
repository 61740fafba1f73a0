// Command spool-livenessprobe stands in for the CSI livenessprobe sidecar,
// which the Go module proxy does not serve, in Spool's deploy tests. It takes
// livenessprobe's flags and serves /healthz: 200 when the driver answers
// Probe with ready (or no readiness), 500 otherwise.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket")
	httpEndpoint := flag.String("http-endpoint", "", "serve /healthz at this host:port")
	healthPort := flag.Int("health-port", 9808, "port for /healthz when --http-endpoint is empty (deprecated upstream)")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "timeout of the Probe call")
	metricsAddress := flag.String("metrics-address", "", "ignored (kept for compatibility)")
	metricsPath := flag.String("metrics-path", "/metrics", "ignored (kept for compatibility)")
	klog.InitFlags(nil)
	flag.Parse()
	_, _ = metricsAddress, metricsPath
	addr := *httpEndpoint
	if addr == "" {
		addr = fmt.Sprintf(":%d", *healthPort)
	}
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		klog.ErrorS(err, "connect to the driver", "address", *csiAddress)
		os.Exit(1)
	}
	defer conn.Close()
	id := csi.NewIdentityClient(conn)
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		resp, err := id.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			klog.ErrorS(err, "health check failed")
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if rd := resp.GetReady(); rd != nil && !rd.GetValue() {
			http.Error(w, "driver is not ready", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	klog.InfoS("serving /healthz", "address", addr, "csiAddress", *csiAddress)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		klog.ErrorS(err, "serve /healthz")
		os.Exit(1)
	}
}
