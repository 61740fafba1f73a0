package loop

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// mountedAt returns a mount point in this process's mount namespace whose
// source is the block device rdev (devPath), or "" if there is none.
//
// Field 3 of mountinfo (major:minor) is the filesystem's s_dev, which is the
// device itself for ext4 and xfs but an anonymous device for btrfs, so the
// mount source is compared as well.
func mountedAt(rdev uint64, devPath string) (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	for line := range strings.Lines(string(data)) {
		// id parent maj:min root mountpoint options [optional...] - fstype source superopts
		fields := strings.Fields(line)
		sep := slices.Index(fields, "-")
		if sep < 6 || len(fields) < sep+3 {
			continue
		}
		mountPoint := unescapeMountinfo(fields[4])
		if dev, err := parseMajorMinor(fields[2]); err == nil && dev == rdev {
			return mountPoint, nil
		}
		source := unescapeMountinfo(fields[sep+2])
		if source == devPath {
			return mountPoint, nil
		}
		// Another name for the same node (e.g. a symlink under /dev/disk).
		if strings.HasPrefix(source, "/dev/") {
			var st unix.Stat_t
			if unix.Stat(source, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && uint64(st.Rdev) == rdev {
				return mountPoint, nil
			}
		}
	}
	return "", nil
}

// unescapeMountinfo undoes the kernel's octal escaping (\040 for space etc.)
// of paths in mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
