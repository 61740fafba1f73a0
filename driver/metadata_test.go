package driver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/volid"
)

// metadataFixture serves a controller-only driver over its socket, with one
// block volume whose image the test writes as a node would.
type metadataFixture struct {
	d      *Driver
	md     csi.SnapshotMetadataClient
	ctrl   csi.ControllerClient
	volID  string
	image  string
	t      *testing.T
	snapNo int
}

func newMetadataFixture(t *testing.T) *metadataFixture {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	d := newTestDriver(t, newFakeKernel(), func(o *Options) { o.Mode, o.Endpoint = ModeController, "unix://"+sock })
	conn := serve(t, d)
	f := &metadataFixture{d: d, md: csi.NewSnapshotMetadataClient(conn), ctrl: csi.NewControllerClient(conn), t: t}
	v, err := f.ctrl.CreateVolume(context.Background(), createReq("cbt", 8<<20, blockCap()))
	if err != nil {
		t.Fatal(err)
	}
	f.volID = v.GetVolume().GetVolumeId()
	id, err := volid.Parse(f.volID)
	if err != nil {
		t.Fatal(err)
	}
	f.image = filepath.Join(d.opts.Pools[0].Dir, "volumes", id.Token, "disk.img")
	return f
}

func (f *metadataFixture) write(off int64, b []byte) {
	img, err := os.OpenFile(f.image, os.O_WRONLY, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(b, off); err != nil {
		f.t.Fatal(err)
	}
}

func (f *metadataFixture) snapshot() *csi.Snapshot {
	f.snapNo++
	s, err := f.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s" + string(rune('0'+f.snapNo)), SourceVolumeId: f.volID})
	if err != nil {
		f.t.Fatal(err)
	}
	return s.GetSnapshot()
}

// metadataResponse is what GetMetadataAllocated and GetMetadataDelta
// responses have in common.
type metadataResponse interface {
	GetBlockMetadataType() csi.BlockMetadataType
	GetVolumeCapacityBytes() int64
	GetBlockMetadata() []*csi.BlockMetadata
}

// drain reads a stream to its end and checks the rules every message
// follows: at most maxResults ranges (1024 when 0), VARIABLE_LENGTH,
// the capacity given, ranges ascending without overlap.
func drain[R metadataResponse](t *testing.T, recv func() (R, error), maxResults int, capacity int64) ([]*csi.BlockMetadata, int, error) {
	t.Helper()
	if maxResults == 0 {
		maxResults = metadataBatch
	}
	var all []*csi.BlockMetadata
	messages := 0
	for {
		r, err := recv()
		if errors.Is(err, io.EOF) {
			return all, messages, nil
		}
		if err != nil {
			return all, messages, err
		}
		messages++
		if r.GetBlockMetadataType() != csi.BlockMetadataType_VARIABLE_LENGTH {
			t.Fatalf("block metadata type %v", r.GetBlockMetadataType())
		}
		if r.GetVolumeCapacityBytes() != capacity {
			t.Fatalf("volume capacity %d, want %d", r.GetVolumeCapacityBytes(), capacity)
		}
		if n := len(r.GetBlockMetadata()); n > maxResults {
			t.Fatalf("a message carries %d ranges, max_results %d", n, maxResults)
		}
		for _, b := range r.GetBlockMetadata() {
			if n := len(all); n > 0 && all[n-1].GetByteOffset()+all[n-1].GetSizeBytes() > b.GetByteOffset() {
				t.Fatalf("range %v overlaps %v", b, all[n-1])
			}
			if b.GetSizeBytes() <= 0 {
				t.Fatalf("range %v is empty", b)
			}
			all = append(all, b)
		}
	}
}

func allocated(t *testing.T, f *metadataFixture, req *csi.GetMetadataAllocatedRequest, capacity int64) ([]*csi.BlockMetadata, int, error) {
	t.Helper()
	s, err := f.md.GetMetadataAllocated(context.Background(), req)
	if err != nil {
		return nil, 0, err
	}
	return drain(t, s.Recv, int(req.GetMaxResults()), capacity)
}

func delta(t *testing.T, f *metadataFixture, req *csi.GetMetadataDeltaRequest, capacity int64) ([]*csi.BlockMetadata, int, error) {
	t.Helper()
	s, err := f.md.GetMetadataDelta(context.Background(), req)
	if err != nil {
		return nil, 0, err
	}
	return drain(t, s.Recv, int(req.GetMaxResults()), capacity)
}

func ranges(b []*csi.BlockMetadata) [][2]int64 {
	out := make([][2]int64, 0, len(b))
	for _, x := range b {
		out = append(out, [2]int64{x.GetByteOffset(), x.GetSizeBytes()})
	}
	return out
}

func TestSnapshotMetadataService(t *testing.T) {
	f := newMetadataFixture(t)
	ctx := context.Background()
	caps, err := f.d.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range caps.GetCapabilities() {
		found = found || c.GetService().GetType() == csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE
	}
	if !found {
		t.Fatal("the controller does not advertise SNAPSHOT_METADATA_SERVICE")
	}

	// An empty snapshot: one message, no ranges.
	empty := f.snapshot()
	got, messages, err := allocated(t, f, &csi.GetMetadataAllocatedRequest{SnapshotId: empty.GetSnapshotId()}, 8<<20)
	if err != nil || len(got) != 0 || messages != 1 {
		t.Fatalf("allocated of an empty snapshot: %v in %d messages, %v; want one message with none", got, messages, err)
	}

	one := bytes.Repeat([]byte{1}, 4096)
	for i := int64(0); i < 6; i++ {
		f.write(i*1<<20, one) // six ranges, one per MiB
	}
	s1 := f.snapshot()
	time.Sleep(10 * time.Millisecond) // distinct creation times
	f.write(2<<20+100, []byte("changed"))
	f.write(5<<20, one) // the same bytes again: not a change
	if _, err := f.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: f.volID, CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}}); err != nil {
		t.Fatal(err)
	}
	f.write(12<<20, one) // in the expanded part
	s2 := f.snapshot()

	got, messages, err = allocated(t, f, &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), MaxResults: 4}, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]int64{{0, 4096}, {1 << 20, 4096}, {2 << 20, 4096}, {3 << 20, 4096}, {4 << 20, 4096}, {5 << 20, 4096}}
	if !equalRanges(ranges(got), want) || messages != 2 {
		t.Fatalf("allocated of s1: %v in %d messages, want %v in 2", ranges(got), messages, want)
	}
	// Resumed inside the third range.
	got, _, err = allocated(t, f, &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), StartingOffset: 2<<20 + 10}, 8<<20)
	if err != nil || len(got) != 4 || got[0].GetByteOffset()+got[0].GetSizeBytes() != 2<<20+4096 || got[0].GetByteOffset() < 2<<20 {
		t.Fatalf("allocated from inside the third range: %v, %v", ranges(got), err)
	}

	got, _, err = delta(t, f, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId()}, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	want = [][2]int64{{2 << 20, 4096}, {12 << 20, 4096}}
	if !equalRanges(ranges(got), want) {
		t.Fatalf("delta s1 -> s2: %v, want %v", ranges(got), want)
	}
	got, _, err = delta(t, f, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId(), StartingOffset: 3 << 20}, 16<<20)
	if err != nil || !equalRanges(ranges(got), want[1:]) {
		t.Fatalf("delta s1 -> s2 from 3 MiB: %v, %v; want %v", ranges(got), err, want[1:])
	}
	// At the very end: nothing left, still one message.
	got, messages, err = delta(t, f, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId(), StartingOffset: 16 << 20}, 16<<20)
	if err != nil || len(got) != 0 || messages != 1 {
		t.Fatalf("delta from the end: %v in %d messages, %v", ranges(got), messages, err)
	}

	// Refusals, with the spec's codes.
	other, err := f.ctrl.CreateVolume(ctx, createReq("other", 8<<20, blockCap()))
	if err != nil {
		t.Fatal(err)
	}
	os3, err := f.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "other-snap", SourceVolumeId: other.GetVolume().GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	unknown := "default:node-1:snap-000000000000000000000000"
	for _, c := range []struct {
		name string
		a    *csi.GetMetadataAllocatedRequest
		d    *csi.GetMetadataDeltaRequest
		code codes.Code
	}{
		{"no snapshot ID", &csi.GetMetadataAllocatedRequest{}, nil, codes.InvalidArgument},
		{"unknown snapshot", &csi.GetMetadataAllocatedRequest{SnapshotId: unknown}, nil, codes.NotFound},
		{"malformed snapshot ID", &csi.GetMetadataAllocatedRequest{SnapshotId: "../../etc"}, nil, codes.NotFound},
		{"a volume ID", &csi.GetMetadataAllocatedRequest{SnapshotId: f.volID}, nil, codes.NotFound},
		{"negative offset", &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), StartingOffset: -1}, nil, codes.OutOfRange},
		{"offset past the end", &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), StartingOffset: 8<<20 + 1}, nil, codes.OutOfRange},
		{"negative max_results", &csi.GetMetadataAllocatedRequest{SnapshotId: s1.GetSnapshotId(), MaxResults: -1}, nil, codes.InvalidArgument},
		{"no base", nil, &csi.GetMetadataDeltaRequest{TargetSnapshotId: s2.GetSnapshotId()}, codes.InvalidArgument},
		{"no target", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId()}, codes.InvalidArgument},
		{"unknown base", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: unknown, TargetSnapshotId: s2.GetSnapshotId()}, codes.NotFound},
		{"unknown target", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: unknown}, codes.NotFound},
		{"different volumes", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: os3.GetSnapshot().GetSnapshotId()}, codes.InvalidArgument},
		{"base newer than target", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s2.GetSnapshotId(), TargetSnapshotId: s1.GetSnapshotId()}, codes.InvalidArgument},
		{"delta offset past the end", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId(), StartingOffset: 16<<20 + 1}, codes.OutOfRange},
		{"delta negative max_results", nil, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.GetSnapshotId(), TargetSnapshotId: s2.GetSnapshotId(), MaxResults: -5}, codes.InvalidArgument},
	} {
		var err error
		if c.a != nil {
			_, _, err = allocated(t, f, c.a, 0)
		} else {
			_, _, err = delta(t, f, c.d, 0)
		}
		if status.Code(err) != c.code {
			t.Errorf("%s: %v, want %s", c.name, err, c.code)
		}
	}

	// A snapshot deleted while nobody reads it is gone.
	if _, err := f.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: empty.GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := allocated(t, f, &csi.GetMetadataAllocatedRequest{SnapshotId: empty.GetSnapshotId()}, 8<<20); status.Code(err) != codes.NotFound {
		t.Fatalf("allocated of a deleted snapshot: %v", err)
	}
}

func equalRanges(a, b [][2]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
