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
	d.metrics.ObserveRequest(info.FullMethod, status.Code(err).String(), time.Since(start))
	if err != nil {
		st, _ := status.FromError(err)
		lvl := klog.Level(2)
		if st.Code() == codes.Internal || st.Code() == codes.Unknown {
			lvl = 0
		}
		klog.V(lvl).InfoS("CSI call failed", "method", info.FullMethod, "code", st.Code().String(), "message", st.Message(), "duration", time.Since(start))
		return nil, err
	}
	klog.V(4).InfoS("CSI response", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp), "duration", time.Since(start))
	return resp, nil
}

// toStatus maps an error to its gRPC status, in one place: errors that
// carry a status keep it; the sentinel errors of the packages below the
// driver get the code that tells the CO what to do; anything else is an
// unexpected failure, Internal.
func toStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, pool.ErrBusy):
		code = codes.Aborted // another process holds the lock: retry
	case errors.Is(err, pool.ErrUntrusted):
		code = codes.FailedPrecondition // an administrator must look at the pool
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
