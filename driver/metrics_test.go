package driver

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/pkg/pool"
)

// The metrics endpoint counts calls by method and code and reports the
// pools as they are at scrape time.
func TestMetricsEndpoint(t *testing.T) {
	dir := t.TempDir()
	d, err := New(Options{
		Endpoint: "unix://" + filepath.Join(dir, "csi.sock"), NodeID: testNode, Version: "test", Mode: ModeController,
		Pools:          []pool.Spec{{Name: "default", Dir: filepath.Join(dir, "pool"), Capacity: 1 << 30}},
		MetricsAddress: "127.0.0.1:0",
	}, Kernel{})
	if err != nil {
		t.Fatal(err)
	}
	conn := serve(t, d)
	ctx := context.Background()
	cc := csi.NewControllerClient(conn)
	if _, err := cc.CreateVolume(ctx, createReq("metrics", 64<<20, mountCap("ext4"))); err != nil {
		t.Fatal(err)
	}
	if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{}); err == nil {
		t.Fatal("CreateVolume without a name succeeded")
	}

	resp, err := http.Get("http://" + d.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %d %v", resp.StatusCode, err)
	}
	text := string(body)
	for _, want := range []string{
		`spool_csi_requests_total{code="OK",method="/csi.v1.Controller/CreateVolume"} 1`,
		`spool_csi_requests_total{code="InvalidArgument",method="/csi.v1.Controller/CreateVolume"} 1`,
		`spool_csi_request_duration_seconds_count{code="OK",method="/csi.v1.Controller/CreateVolume"} 1`,
		`spool_pool_capacity_bytes{pool="default"} 1.073741824e+09`,
		`spool_pool_provisioned_bytes{pool="default"} 6.7108864e+07`,
		`spool_pool_available_bytes{pool="default"} 1.00663296e+09`,
		`spool_volumes{pool="default"} 1`,
		`spool_snapshots{pool="default"} 0`,
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		t.Logf("scraped:\n%s", grepSpool(text))
	}
}

func grepSpool(text string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "spool_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
