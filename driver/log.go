package driver

import (
	"context"
	"time"

	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// intercept logs every call with its secrets stripped, counts it in the
// metrics, and turns errors that carry no gRPC code (unexpected failures)
// into Internal.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	klog.V(4).InfoS("CSI request", "method", info.FullMethod, "request", protosanitizer.StripSecrets(req))
	resp, err := handler(ctx, req)
	d.metrics.ObserveRequest(info.FullMethod, status.Code(err).String(), time.Since(start))
	if err != nil {
		st, ok := status.FromError(err)
		if !ok {
			st = status.New(codes.Internal, err.Error())
			err = st.Err()
		}
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
