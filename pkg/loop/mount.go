package loop

import (
	"fmt"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// mountedAt returns a mount point in this process's mount namespace whose
// source is the block device rdev (devPath), or "" if there is none.
//
// The major:minor of a mount is the filesystem's s_dev, which is the device
// itself for ext4 and xfs but an anonymous device for btrfs, so the mount
// source is compared as well.
func mountedAt(rdev uint64, devPath string) (string, error) {
	infos, err := mountinfo.GetMounts(nil)
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	for _, m := range infos {
		if uint32(m.Major) == unix.Major(rdev) && uint32(m.Minor) == unix.Minor(rdev) {
			return m.Mountpoint, nil
		}
		if m.Source == devPath {
			return m.Mountpoint, nil
		}
		// Another name for the same node (e.g. a symlink under /dev/disk).
		if strings.HasPrefix(m.Source, "/dev/") {
			var st unix.Stat_t
			if unix.Stat(m.Source, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && uint64(st.Rdev) == rdev {
				return m.Mountpoint, nil
			}
		}
	}
	return "", nil
}
