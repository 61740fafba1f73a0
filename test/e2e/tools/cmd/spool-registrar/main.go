// Command spool-registrar registers a CSI driver with kubelet through the
// kubelet plugin registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1).
//
// It stands in for node-driver-registrar, which the Go module proxy does not
// serve, in Spool's end-to-end harness. It takes node-driver-registrar's
// flags: it asks the driver for its name over --csi-address, then serves the
// Registration service on <plugin-registration-path>/<driver>-reg.sock, where
// kubelet's plugin watcher finds it. kubelet then dials
// --kubelet-registration-path, the driver's socket as kubelet sees it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
	failed           chan error
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.InfoS("kubelet asked for plugin info", "driver", r.driver)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		klog.ErrorS(nil, "kubelet refused the registration", "driver", r.driver, "error", st.Error)
		select {
		case r.failed <- fmt.Errorf("kubelet refused the registration: %s", st.Error):
		default:
		}
	} else {
		klog.InfoS("registered with kubelet", "driver", r.driver)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(ctx context.Context, address string, timeout time.Duration) (string, error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", address, err)
	}
	defer conn.Close()
	deadline := time.Now().Add(timeout)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := csi.NewIdentityClient(conn).GetPluginInfo(cctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return resp.GetName(), nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return "", fmt.Errorf("GetPluginInfo on %s: %w", address, err)
		}
		klog.InfoS("waiting for the CSI driver", "address", address, "error", err)
		time.Sleep(time.Second)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's socket, as this process sees it")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket, as kubelet sees it")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory")
	httpEndpoint := flag.String("http-endpoint", "", "serve /healthz at this host:port (empty: off)")
	timeout := flag.Duration("timeout", 5*time.Minute, "how long to wait for the driver to answer GetPluginInfo")
	klog.InitFlags(nil)
	flag.Parse()
	if *kubeletPath == "" {
		fmt.Fprintln(os.Stderr, "--kubelet-registration-path is required")
		os.Exit(2)
	}
	if err := run(*csiAddress, *kubeletPath, *regDir, *httpEndpoint, *timeout); err != nil {
		klog.ErrorS(err, "spool-registrar failed")
		os.Exit(1)
	}
}

func run(csiAddress, kubeletPath, regDir, httpEndpoint string, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	name, err := driverName(ctx, csiAddress, timeout)
	if err != nil {
		return err
	}
	sock := filepath.Join(regDir, name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale %s: %w", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	defer os.Remove(sock)
	r := &registrar{driver: name, endpoint: kubeletPath, failed: make(chan error, 1)}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	klog.InfoS("serving plugin registration", "socket", sock, "driver", name, "endpoint", kubeletPath)

	if httpEndpoint != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(sock); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		hs := &http.Server{Addr: httpEndpoint, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := hs.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "health endpoint failed")
			}
		}()
		defer hs.Close()
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-r.failed:
		return err
	}
}
