//go:build faults

package faults

import (
	"os"
	"syscall"

	"k8s.io/klog/v2"
)

// EnvPoint names the point at which the process kills itself.
const EnvPoint = "SPOOL_FAULT_POINT"

var point = os.Getenv(EnvPoint)

// Point kills the process with SIGKILL, like a crash or the OOM killer,
// when name is the point SPOOL_FAULT_POINT names.
func Point(name string) {
	if point == "" || name != point {
		return
	}
	klog.InfoS("Fault injection: killing the driver", "point", name)
	klog.Flush()
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // never returns
}
