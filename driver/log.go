package driver

import (
	"context"
	"errors"
	"time"

	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
)

// intercept logs every call with its secrets stripped, counts it in the
// metrics, and gives errors that carry no gRPC code theirs (toStatus).
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	klog.V(4).InfoS("CSI request", "method", info.FullMethod, "request", protosanitizer.StripSecrets(req))
	resp, err := handler(ctx, req)
	if err != nil {
		err = toStatus(err)
	}
	if d.observe(info.FullMethod, err, start) {
		return nil, err
	}
	klog.V(4).InfoS("CSI response", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp), "duration", time.Since(start))
	return resp, nil
}

// observe counts a call that ended in err (nil or a status) and logs a
// failure: Internal and Unknown always, the others at -v 2. It reports
// whether the call failed.
func (d *Driver) observe(method string, err error, start time.Time) bool {
	d.metrics.ObserveRequest(method, status.Code(err).String(), time.Since(start))
	if err == nil {
		return false
	}
	st, _ := status.FromError(err)
	lvl := klog.Level(2)
	if st.Code() == codes.Internal || st.Code() == codes.Unknown {
		lvl = 0
	}
	klog.V(lvl).InfoS("CSI call failed", "method", method, "code", st.Code().String(), "message", st.Message(), "duration", time.Since(start))
	return true
}

// interceptStream does for streaming calls (the SnapshotMetadata service)
// what intercept does for unary ones: the request is logged as it is
// received, the outcome when the stream ends.
func (d *Driver) interceptStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, &loggedStream{ServerStream: ss, method: info.FullMethod})
	if err != nil {
		err = toStatus(err)
	}
	if d.observe(info.FullMethod, err, start) {
		return err
	}
	klog.V(4).InfoS("CSI stream done", "method", info.FullMethod, "duration", time.Since(start))
	return nil
}

// loggedStream logs the requests a streaming call receives, secrets
// stripped.
type loggedStream struct {
	grpc.ServerStream
	method string
}

func (s *loggedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		klog.V(4).InfoS("CSI request", "method", s.method, "request", protosanitizer.StripSecrets(m))
	}
	return err
}

// ToStatus maps an error of a handler to its gRPC status, in one place (the
// interceptor, and the offline controller of `spool volume`): errors that
// carry a status keep it; the error kinds of the packages below the driver
// get the code that tells the CO what to do; anything else is an
// unexpected failure, Internal. nil stays nil.
func ToStatus(err error) error { return toStatus(err) }

// kindCodes are the gRPC codes of the error kinds of the packages below
// the driver.
var kindCodes = []struct {
	kind error
	code codes.Code
}{
	{pool.ErrNotFound, codes.NotFound},
	{pool.ErrExhausted, codes.ResourceExhausted},
	{pool.ErrInProgress, codes.Aborted},  // the CO retries
	{pool.ErrBusy, codes.Aborted},        // another process holds the lock: retry
	{pool.ErrTooSmall, codes.OutOfRange}, // a copy smaller than its source
	{pool.ErrUnsupported, codes.InvalidArgument},
	{pool.ErrInUse, codes.FailedPrecondition},
	{pool.ErrUntrusted, codes.FailedPrecondition}, // an administrator must look at the pool
	{fs.ErrNotEmpty, codes.FailedPrecondition},    // a CO path holds what Spool did not make
}

func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	for _, pc := range kindCodes {
		if errors.Is(err, pc.kind) {
			return status.Error(pc.code, err.Error())
		}
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}

func invalidf(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

func notFoundf(format string, args ...any) error {
	return status.Errorf(codes.NotFound, format, args...)
}

func preconditionf(format string, args ...any) error {
	return status.Errorf(codes.FailedPrecondition, format, args...)
}

func abortedf(format string, args ...any) error {
	return status.Errorf(codes.Aborted, format, args...)
}

func alreadyExistsf(format string, args ...any) error {
	return status.Errorf(codes.AlreadyExists, format, args...)
}

// isNotFound reports whether err says that the object does not exist.
func isNotFound(err error) bool {
	return status.Code(toStatus(err)) == codes.NotFound
}
