// Package version holds the driver's version, set at build time with
// -ldflags "-X github.com/spool-csi/spool/pkg/version.Version=v1.2.3".
package version

import "runtime/debug"

// Version is the release version; never empty.
var Version = ""

// Get returns the version: the linker-provided one, else the module version
// recorded by the Go toolchain, else "devel".
func Get() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}
