package fs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FIFREEZE and FITHAW from linux/fs.h: _IOWR('X', 119, int) and
// _IOWR('X', 120, int). golang.org/x/sys does not define them.
const (
	fifreeze = 0xC0045877
	fithaw   = 0xC0045878
)

// Freeze flushes the filesystem mounted at path and blocks writes to it
// until the returned thaw is called, so that a copy of its device taken in
// between holds a consistent filesystem.
func Freeze(path string) (thaw func() error, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening %s to freeze it: %w", path, err)
	}
	if err := unix.IoctlSetInt(int(f.Fd()), fifreeze, 0); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("freezing %s: %w", path, err)
	}
	klog.V(4).InfoS("Froze filesystem", "path", path)
	return func() error {
		defer func() { _ = f.Close() }()
		if err := unix.IoctlSetInt(int(f.Fd()), fithaw, 0); err != nil {
			return fmt.Errorf("thawing %s: %w", path, err)
		}
		klog.V(4).InfoS("Thawed filesystem", "path", path)
		return nil
	}, nil
}

// Thaw thaws the filesystem mounted at path if it is frozen, and reports
// whether it was. A filesystem frozen by a process that died stays frozen,
// even after it is unmounted, until someone thaws it.
func Thaw(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("opening %s to thaw it: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	if err := unix.IoctlSetInt(int(f.Fd()), fithaw, 0); err != nil {
		if errors.Is(err, unix.EINVAL) { // not frozen
			return false, nil
		}
		return false, fmt.Errorf("thawing %s: %w", path, err)
	}
	return true, nil
}
