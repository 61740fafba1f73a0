package driver

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/extents"
	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// The SnapshotMetadata service (changed block tracking): which ranges of a
// snapshot hold data, and which changed between two snapshots of a volume,
// answered from the snapshot images in the pool (pkg/extents). The ranges
// are of the volume's image, for block and filesystem volumes alike (of
// the ciphertext for an encrypted one).

// metadataBatch is how many ranges one response message carries when the
// request leaves it to Spool (max_results 0): about 16 KiB of protobuf.
const metadataBatch = 1024

// GetMetadataAllocated streams the ranges of a snapshot's image that hold
// data, from starting_offset on.
func (d *Controller) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, stream csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	ctx := stream.Context()
	if err := checkMaxResults(req.GetMaxResults()); err != nil {
		return err
	}
	s, img, err := d.openSnapshot(req.GetSnapshotId(), "snapshot_id")
	if err != nil {
		return err
	}
	defer img.Close()
	from := req.GetStartingOffset()
	if err := checkStartingOffset(from, s.SizeBytes); err != nil {
		return err
	}
	start := time.Now()
	out := &rangeSender{max: batchSize(req.GetMaxResults()), send: func(list []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataAllocatedResponse{
			BlockMetadataType:   csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: s.SizeBytes,
			BlockMetadata:       list,
		})
	}}
	err = extents.Allocated(ctx, img, from, s.SizeBytes, out.add)
	if err == nil {
		err = out.close()
	}
	if err != nil {
		return streamError(ctx, err, "listing the allocated ranges of snapshot %s", s.ID)
	}
	klog.V(2).InfoS("Listed the allocated ranges of a snapshot", "snapshotID", s.ID, "startingOffset", from,
		"ranges", out.ranges, "bytes", out.bytes, "messages", out.messages, "duration", time.Since(start))
	return nil
}

// GetMetadataDelta streams the ranges in which the target snapshot differs
// from the base snapshot of the same volume, from starting_offset on.
func (d *Controller) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, stream csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	ctx := stream.Context()
	if err := checkMaxResults(req.GetMaxResults()); err != nil {
		return err
	}
	base, baseImg, err := d.openSnapshot(req.GetBaseSnapshotId(), "base_snapshot_id")
	if err != nil {
		return err
	}
	defer baseImg.Close()
	target, targetImg, err := d.openSnapshot(req.GetTargetSnapshotId(), "target_snapshot_id")
	if err != nil {
		return err
	}
	defer targetImg.Close()
	if base.SourceVolumeID != target.SourceVolumeID {
		return invalidf("snapshots %s and %s are of different volumes (%s and %s): a delta is between two snapshots of one volume",
			base.ID, target.ID, base.SourceVolumeID, target.SourceVolumeID)
	}
	if base.CreatedAt.After(target.CreatedAt) {
		return invalidf("base snapshot %s (%s) was taken after target snapshot %s (%s): the base must be the older one",
			base.ID, base.CreatedAt.Format(time.RFC3339Nano), target.ID, target.CreatedAt.Format(time.RFC3339Nano))
	}
	from := req.GetStartingOffset()
	if err := checkStartingOffset(from, target.SizeBytes); err != nil {
		return err
	}
	start := time.Now()
	out := &rangeSender{max: batchSize(req.GetMaxResults()), send: func(list []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataDeltaResponse{
			BlockMetadataType:   csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: target.SizeBytes,
			BlockMetadata:       list,
		})
	}}
	// Snapshots that are both reflinks of the volume's image differ where
	// their extents do; copies are compared (pkg/extents).
	reflinks := base.Method == string(imagecopy.Reflink) && target.Method == string(imagecopy.Reflink)
	st, err := extents.Delta(ctx, baseImg, targetImg, base.SizeBytes, target.SizeBytes, from,
		extents.DeltaOptions{TrustExtents: reflinks}, out.add)
	if err == nil {
		err = out.close()
	}
	if err != nil {
		return streamError(ctx, err, "computing the delta from snapshot %s to %s", base.ID, target.ID)
	}
	klog.V(2).InfoS("Listed the changed ranges between two snapshots", "baseSnapshotID", base.ID, "targetSnapshotID", target.ID,
		"startingOffset", from, "ranges", out.ranges, "bytes", out.bytes, "messages", out.messages, "method", st.Method,
		"sharedBytes", st.SharedBytes, "comparedBytes", st.ComparedBytes, "duration", time.Since(start))
	return nil
}

// openSnapshot finds a snapshot served here and opens its image. field
// names the request field, for the error.
func (d *Controller) openSnapshot(id, field string) (pool.Snapshot, *os.File, error) {
	if id == "" {
		return pool.Snapshot{}, nil, invalidf("%s is missing", field)
	}
	p, sid, err := d.pools.resolve(id, volid.KindSnapshot)
	if err != nil {
		return pool.Snapshot{}, nil, err
	}
	return p.OpenSnapshotImage(sid.Token)
}

func checkMaxResults(n int32) error {
	if n < 0 {
		return invalidf("max_results must not be negative, got %d", n)
	}
	return nil
}

// checkStartingOffset: the spec's OUT_OF_RANGE for an offset that is
// negative or past the volume's size.
func checkStartingOffset(off, size int64) error {
	if off < 0 || off > size {
		return status.Errorf(codes.OutOfRange, "starting_offset %d is outside the snapshot's %d bytes", off, size)
	}
	return nil
}

func batchSize(maxResults int32) int {
	if maxResults > 0 && maxResults < metadataBatch {
		return int(maxResults)
	}
	return metadataBatch
}

// streamError is the error of a stream that failed after it started: the
// client's own cancellation keeps its code, anything else says what was
// being done.
func streamError(ctx context.Context, err error, format string, args ...any) error {
	if ctx.Err() != nil {
		return toStatus(ctx.Err())
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return toStatus(fmt.Errorf(format+": %w", append(args, err)...))
}

// rangeSender batches ranges into response messages of at most max ranges.
type rangeSender struct {
	max      int
	send     func([]*csi.BlockMetadata) error
	buf      []*csi.BlockMetadata
	messages int
	ranges   int
	bytes    int64
}

func (r *rangeSender) add(x extents.Range) error {
	r.buf = append(r.buf, &csi.BlockMetadata{ByteOffset: x.Offset, SizeBytes: x.Length})
	r.ranges++
	r.bytes += x.Length
	if len(r.buf) >= r.max {
		return r.flush()
	}
	return nil
}

func (r *rangeSender) flush() error {
	list := r.buf
	r.buf = nil
	r.messages++
	return r.send(list)
}

// close sends what is left; a stream with no ranges at all still sends one
// message, which carries the capacity and the metadata type.
func (r *rangeSender) close() error {
	if len(r.buf) == 0 && r.messages > 0 {
		return nil
	}
	return r.flush()
}
