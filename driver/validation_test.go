package driver

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/pool"
)

func TestVolumeSize(t *testing.T) {
	const mi = 1 << 20
	for _, c := range []struct {
		req, lim int64
		fsType   string
		want     int64
		code     codes.Code
	}{
		{0, 0, "", DefaultVolumeSize, codes.OK},
		{0, 10 * mi, "", 10 * mi, codes.OK},
		{1, 0, "", mi, codes.OK},
		{mi + 1, 0, "ext4", 2 * mi, codes.OK},
		{10 * mi, 0, "xfs", 300 * mi, codes.OK},
		{10 * mi, 0, "btrfs", 256 * mi, codes.OK},
		{10 * mi, 100 * mi, "xfs", 0, codes.OutOfRange},
		{mi + 1, mi + 1, "", 0, codes.OutOfRange},
		{2 * mi, mi, "", 0, codes.OutOfRange},
		{-1, 0, "", 0, codes.InvalidArgument},
		{0, -1, "", 0, codes.InvalidArgument},
		{1<<63 - 1, 0, "", 0, codes.OutOfRange},
	} {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: c.req, LimitBytes: c.lim}, c.fsType)
		if status.Code(toStatus(err)) != c.code || got != c.want {
			t.Errorf("volumeSize(%d, %d, %q) = %d, %v; want %d, %s", c.req, c.lim, c.fsType, got, err, c.want, c.code)
		}
	}
}

func TestParseParams(t *testing.T) {
	p, err := parseParams(map[string]string{"pool": "fast", "provisioning": "thick", "csi.storage.k8s.io/pvc/name": "data"})
	if err != nil || p.pool != "fast" || p.provisioning != pool.Thick {
		t.Fatalf("parseParams: %+v %v", p, err)
	}
	p, err = parseParams(nil)
	if err != nil || p.pool != "" || p.provisioning != pool.Thin {
		t.Fatalf("defaults: %+v %v", p, err)
	}
	for _, bad := range []map[string]string{
		{"pool": ""}, {"pool": "../x"}, {"pool": "Fast"}, {"provisioning": "THIN"}, {"fsType": "ext4"}, {"": "x"},
	} {
		if _, err := parseParams(bad); status.Code(toStatus(err)) != codes.InvalidArgument {
			t.Errorf("parseParams(%v) = %v, want InvalidArgument", bad, err)
		}
	}
}

func TestSocketPath(t *testing.T) {
	for in, want := range map[string]string{"unix:///run/csi.sock": "/run/csi.sock", "unix:/run/x/../csi.sock": "/run/csi.sock"} {
		if got, err := socketPath(in); err != nil || got != want {
			t.Errorf("socketPath(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "/run/csi.sock", "tcp://127.0.0.1:10000", "unix://host/csi.sock", "unix:relative.sock"} {
		if _, err := socketPath(bad); err == nil {
			t.Errorf("socketPath(%q) succeeded", bad)
		}
	}
}

func FuzzParseParams(f *testing.F) {
	f.Add("pool", "fast", "provisioning", "thick")
	f.Add("pool", "../../etc", "csi.storage.k8s.io/pvc/name", "x")
	f.Add("provisioning", "THIN", "", "")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		p, err := parseParams(map[string]string{k1: v1, k2: v2})
		if err != nil {
			if status.Code(toStatus(err)) != codes.InvalidArgument {
				t.Fatalf("parseParams error with code %s: %v", status.Code(toStatus(err)), err)
			}
			return
		}
		if p.pool != "" && (len(p.pool) > 32 || strings.ContainsAny(p.pool, "/.:\\x00")) {
			t.Fatalf("accepted unsafe pool %q", p.pool)
		}
		if p.provisioning != pool.Thin && p.provisioning != pool.Thick {
			t.Fatalf("accepted provisioning %q", p.provisioning)
		}
	})
}

func FuzzVolumeSize(f *testing.F) {
	f.Add(int64(0), int64(0), "")
	f.Add(int64(1<<62), int64(0), "xfs")
	f.Add(int64(-1), int64(5), "btrfs")
	f.Add(int64(1<<63-1), int64(1<<63-1), "ext4")
	f.Fuzz(func(t *testing.T, req, lim int64, fsType string) {
		n, err := volumeSize(&csi.CapacityRange{RequiredBytes: req, LimitBytes: lim}, fsType)
		if err != nil {
			if c := status.Code(toStatus(err)); c != codes.InvalidArgument && c != codes.OutOfRange {
				t.Fatalf("volumeSize error with code %s: %v", c, err)
			}
			return
		}
		if n <= 0 || n%(1<<20) != 0 || n < req || (lim > 0 && n > lim) {
			t.Fatalf("volumeSize(%d, %d, %q) = %d", req, lim, fsType, n)
		}
	})
}

// Parameters are stored with the volume: their count and size are bounded.
func TestParameterBounds(t *testing.T) {
	big := map[string]string{}
	for i := range maxParams + 1 {
		big["csi.storage.k8s.io/k"+strconv.Itoa(i)] = "v"
	}
	huge := map[string]string{}
	for i := range 8 {
		huge["csi.storage.k8s.io/k"+strconv.Itoa(i)] = strings.Repeat("x", maxParamValueBytes)
	}
	for name, in := range map[string]map[string]string{
		"too many":   big,
		"long key":   {"csi.storage.k8s.io/" + strings.Repeat("k", maxParamKeyBytes): "v"},
		"long value": {"csi.storage.k8s.io/pvc/name": strings.Repeat("v", maxParamValueBytes+1)},
		"too large":  huge,
	} {
		if _, err := parseParams(in); status.Code(toStatus(err)) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	ok := map[string]string{"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default", ParamProvisioning: "thick"}
	if _, err := parseParams(ok); err != nil {
		t.Errorf("what the external-provisioner sends: %v", err)
	}
}

// A list call with no max_entries returns a page and a token, not
// everything at once; following the tokens lists every volume once.
func TestDefaultPageSize(t *testing.T) {
	d := newTestDriver(t, newFakeKernel())
	ctx := context.Background()
	for i := range defaultPageSize + 1 {
		if _, err := d.CreateVolume(ctx, createReq("v"+strconv.Itoa(i), 1<<20, mountCap("ext4"))); err != nil {
			t.Fatal(err)
		}
	}
	r, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(r.GetEntries()) != defaultPageSize || r.GetNextToken() == "" {
		t.Fatalf("first page: %d entries, token %q, %v", len(r.GetEntries()), r.GetNextToken(), err)
	}
	r2, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: r.GetNextToken()})
	if err != nil || len(r2.GetEntries()) != 1 || r2.GetNextToken() != "" {
		t.Fatalf("second page: %d entries, token %q, %v", len(r2.GetEntries()), r2.GetNextToken(), err)
	}
}
