package cluster

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// has reports whether the image already holds path.
func (img *Image) has(path string) bool {
	for _, f := range img.Files {
		if f.Path == path {
			return true
		}
	}
	return false
}

// AddHostBinary adds the host program src at dst, with the shared libraries
// and the dynamic loader that ldd names for it, at the paths ldd prints: the
// way to make an image of a program without a container engine. A script or
// a static binary is added alone.
func (img *Image) AddHostBinary(ctx context.Context, src, dst string) error {
	f, err := HostFile(src, dst, 0o755)
	if err != nil {
		return err
	}
	img.Files = append(img.Files, f)
	out, err := exec.CommandContext(ctx, "ldd", src).CombinedOutput()
	if err != nil {
		// ldd fails for static binaries and scripts: nothing to add.
		return nil
	}
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Fields(line)
		var lib string
		switch {
		case len(fields) >= 3 && fields[1] == "=>" && strings.HasPrefix(fields[2], "/"):
			lib = fields[2]
		case len(fields) >= 1 && strings.HasPrefix(fields[0], "/"):
			lib = fields[0] // the dynamic loader
		default:
			continue // linux-vdso and the like
		}
		if img.has(lib) {
			continue
		}
		lf, err := HostFile(lib, lib, 0o755)
		if err != nil {
			return fmt.Errorf("library of %s: %w", src, err)
		}
		img.Files = append(img.Files, lf)
	}
	return nil
}

// AddHostProgram adds the program named like PATH lookup finds it, at the
// same path.
func (img *Image) AddHostProgram(ctx context.Context, name string) error {
	path, err := exec.LookPath(name)
	if err != nil {
		return fmt.Errorf("%s for the image: %w", name, err)
	}
	return img.AddHostBinary(ctx, path, path)
}

// spoolTools are the programs Spool runs on the node: util-linux's mount
// and blkid (k8s.io/mount-utils calls them), and the tools that make, check,
// grow and relabel ext4, xfs and btrfs.
var spoolTools = []string{
	"mount", "umount", "blkid", "blockdev", "fsck",
	"mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "resize2fs", "tune2fs", "dumpe2fs",
	"mkfs.xfs", "xfs_growfs", "xfs_admin", "xfs_db", "xfs_io", "xfs_repair",
	"mkfs.btrfs", "btrfs", "btrfstune",
}

// NewSpoolImage is the Spool image made from bin/spool and the host's
// filesystem tools with their libraries; /bin/sh is busybox (xfs_admin is a
// shell script). It holds what the Dockerfile's runtime stage installs.
func NewSpoolImage(ctx context.Context, name, spoolBin, busybox string) (*Image, error) {
	img := &Image{Name: name, Entrypoint: []string{"/usr/local/bin/spool"}}
	if err := img.AddHostBinary(ctx, spoolBin, "/usr/local/bin/spool"); err != nil {
		return nil, err
	}
	for _, t := range spoolTools {
		if err := img.AddHostProgram(ctx, t); err != nil {
			return nil, err
		}
	}
	bb, err := HostFile(busybox, "/bin/busybox", 0o755)
	if err != nil {
		return nil, err
	}
	conf, err := HostFile("/etc/mke2fs.conf", "/etc/mke2fs.conf", 0o644)
	if err != nil {
		return nil, err
	}
	img.Files = append(img.Files, bb, conf,
		File{Path: "/bin/sh", Symlink: "/bin/busybox"},
		File{Path: "/tmp", Mode: 0o1777, Dir: true})
	return img, nil
}

// NewProgramImage is an image of one host program at /entry, its entrypoint,
// as the CSI sidecar images are laid out.
func NewProgramImage(ctx context.Context, name, bin, entry string) (*Image, error) {
	img := &Image{Name: name, Entrypoint: []string{"/" + entry}}
	if err := img.AddHostBinary(ctx, bin, "/"+entry); err != nil {
		return nil, err
	}
	img.Files = append(img.Files, File{Path: "/tmp", Mode: 0o1777, Dir: true})
	return img, nil
}
