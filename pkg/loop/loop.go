// Package loop attaches, finds and detaches Linux loop devices. It is the only
// code in Spool that issues loop ioctls. It talks to the kernel directly
// (/dev/loop-control, /dev/loopN and sysfs) and never runs losetup.
//
// Kernel behaviour this package relies on (Linux >= 5.8 for LOOP_CONFIGURE):
//
//   - LOOP_CTL_GET_FREE only names an unbound device; it does not reserve it.
//     Concurrent attachers race for it and the losers get EBUSY from
//     LOOP_CONFIGURE, so Attach retries with a fresh device.
//   - LOOP_CLR_FD never fails because the device is open: it sets
//     LO_FLAGS_AUTOCLEAR and the real teardown happens on the last close. On a
//     mounted device that means "detach after unmount", which is not what a
//     caller asking to detach wants, so Detach refuses mounted or claimed
//     devices up front and waits for the teardown to finish.
package loop

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Device is an attached loop device.
type Device struct {
	Path        string // "/dev/loop7"
	Number      int    // 7
	BackingFile string // as reported by sysfs backing_file, without the " (deleted)" suffix
	Deleted     bool   // the backing file has been unlinked
	Inode       uint64 // lo_inode from LOOP_GET_STATUS64
	BackingDev  uint64 // lo_device (st_dev of the backing file)
	Rdev        uint64 // the loop block device's own dev_t, for matching against /proc/self/mountinfo
	ReadOnly    bool
	DirectIO    bool
	// Autoclear and PartScan are flags Attach never sets: whoever can write
	// the device node (a pod with a raw block volume) can set them with
	// LOOP_SET_STATUS64. Autoclear detaches the device at its last close;
	// PartScan makes the kernel create partition devices from the bytes
	// the pod wrote.
	Autoclear bool
	PartScan  bool
	// Owner is the owner tag given at attach (Options.Owner), read back
	// from lo_file_name; empty for a device attached without one.
	Owner string
	// Label is the label given at attach (Options.Label), read back from
	// lo_file_name with the owner.
	Label string
}

// Options control how Attach sets up a device.
type Options struct {
	ReadOnly bool
	DirectIO bool
	// Owner tags the device with who attached it, in lo_file_name (which
	// the kernel keeps for the device's life and shows nothing else by;
	// losetup reads the backing file from sysfs). Two node plugins that
	// share one kernel tell their devices apart by it. Letters, digits,
	// '-', '_' and '.'.
	Owner string
	// Label, with an Owner, names what the device is for (a volume), in
	// lo_file_name after the owner. The owner and the label together are
	// at most 50 bytes.
	Label string
}

// ownerPrefix marks an owner tag in lo_file_name: "spool-owner:OWNER/LABEL".
const ownerPrefix = "spool-owner:"

var ownerRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,50}$`)
var labelRE = regexp.MustCompile(`^[A-Za-z0-9._-]{0,49}$`)

// OwnedBy reports whether the device belongs to owner: it carries owner's
// tag, or no tag at all (attached by hand, or by a version of Spool that
// did not tag its devices).
func (d *Device) OwnedBy(owner string) bool { return d.Owner == "" || d.Owner == owner }

var (
	// ErrNotFound means no loop device is attached to the file, or the
	// device named is not attached.
	ErrNotFound = errors.New("loop device not found")
	// ErrAlreadyAttached is returned by Attach, together with the existing
	// device, when the file is already attached.
	ErrAlreadyAttached = errors.New("file is already attached to a loop device")
	// ErrBusy is returned by Detach when the device is mounted, claimed
	// exclusively (by a filesystem, device-mapper, mkfs...), or still held
	// open after it was told to detach.
	ErrBusy = errors.New("loop device is busy")
	// ErrInvalidPath is returned when a device path does not have the form
	// /dev/loopN.
	ErrInvalidPath = errors.New("invalid loop device path")
)

const (
	controlPath = "/dev/loop-control"
	loopMajor   = 7 // LOOP_MAJOR; fixed in the kernel ABI

	// maxMinor bounds N in /dev/loopN (the kernel's MINORMASK + 1).
	maxMinor = 1 << 20

	// attachTries bounds the LOOP_CTL_GET_FREE / LOOP_CONFIGURE race loop.
	attachTries = 32

	// detachTries and detachBackoff bound the retries while something holds
	// the device exclusively (e.g. blkid or mkfs) before Detach gives up:
	// 50+100+200+400 ms between five tries.
	detachTries   = 5
	detachBackoff = 50 * time.Millisecond
)

// teardownTimeout is how long Detach waits for the kernel to finish the
// deferred teardown after LOOP_CLR_FD when another process (typically
// udev's blkid, or another attacher listing the loop devices) has the
// device open. 2 s was too short on a machine busy with I/O: a NodeUnstage
// of make test's TestNodeOperationStorm failed so in .ci/run while
// Kubernetes compiled beside it. The CO's own timeout is longer (the
// sidecars' --timeout=60s). A variable for the tests.
var teardownTimeout = 10 * time.Second

var devPathRE = regexp.MustCompile(`^/dev/loop([0-9]+)$`)

// parseDevPath validates a caller-supplied device path and returns N from
// /dev/loopN. Anything else is rejected before the filesystem is touched.
func parseDevPath(devPath string) (int, error) {
	m := devPathRE.FindStringSubmatch(devPath)
	if m == nil {
		return 0, fmt.Errorf("%w: %q", ErrInvalidPath, devPath)
	}
	n, err := strconv.Atoi(m[1])
	if err != nil || n >= maxMinor {
		return 0, fmt.Errorf("%w: %q: number out of range", ErrInvalidPath, devPath)
	}
	return n, nil
}

func devPathFor(n int) string { return "/dev/loop" + strconv.Itoa(n) }

// fileID identifies a file independently of its path.
type fileID struct{ dev, ino uint64 }

// Attach attaches backingFile to a free loop device.
//
// If the file is already attached it returns the existing device together
// with an error wrapping ErrAlreadyAttached. With DirectIO the kernel picks a
// logical block size that satisfies the backing file's O_DIRECT alignment;
// when it cannot do direct I/O the device is set up with buffered I/O and the
// returned Device has DirectIO=false.
func Attach(backingFile string, opts Options) (*Device, error) {
	if backingFile == "" {
		return nil, errors.New("attach: empty backing file path")
	}
	abs, err := filepath.Abs(backingFile)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", backingFile, err)
	}
	mode := unix.O_RDWR
	if opts.ReadOnly {
		mode = unix.O_RDONLY
	}
	fd, err := unix.Open(abs, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach: open %s: %w", abs, err)
	}
	f := os.NewFile(uintptr(fd), abs)
	defer f.Close()
	return AttachFile(f, opts)
}

// AttachFile attaches the open file f, which must be a regular file opened
// for reading (and for writing unless opts.ReadOnly), as Attach does. The
// file is handed to the kernel by descriptor, so the caller's checks of f
// hold for exactly what gets attached; the kernel takes its own reference.
func AttachFile(f *os.File, opts Options) (*Device, error) {
	abs := f.Name()
	if opts.Owner != "" && (!ownerRE.MatchString(opts.Owner) || !labelRE.MatchString(opts.Label) || len(opts.Owner)+len(opts.Label) > 50) {
		return nil, fmt.Errorf("attach %s: invalid owner tag %q/%q", abs, opts.Owner, opts.Label)
	}
	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("attach: stat %s: %w", abs, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("attach %s: not a regular file", abs)
	}
	id := fileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}

	// Serialise attaches of the same file within this process so that the
	// "already attached" check and LOOP_CONFIGURE are atomic with respect to
	// each other. (Attachers in other processes are not covered; the kernel
	// happily attaches one file to several devices.)
	unlock := lockFile(id)
	defer unlock()

	existing, err := findByID(id, opts.Owner)
	switch {
	case err == nil:
		klog.V(4).InfoS("File already attached to loop device", "backingFile", abs, "device", existing.Path)
		return existing, fmt.Errorf("attach %s: %w as %s", abs, ErrAlreadyAttached, existing.Path)
	case !errors.Is(err, ErrNotFound):
		return nil, fmt.Errorf("attach %s: %w", abs, err)
	}

	ctl, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach %s: open %s: %w", abs, controlPath, err)
	}
	defer unix.Close(ctl)

	cfg := unix.LoopConfig{Fd: uint32(fd)}
	// Never LO_FLAGS_AUTOCLEAR (the device must outlive this call) and never
	// LO_FLAGS_PARTSCAN (images hold a bare filesystem; partition scanning
	// would only add device nodes and udev churn).
	if opts.ReadOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if opts.DirectIO {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	if opts.Owner != "" {
		setFileName(&cfg.Info, ownerPrefix+opts.Owner+"/"+opts.Label)
	} else {
		setFileName(&cfg.Info, abs)
	}

	var lastErr error
	for try := 0; try < attachTries; try++ {
		if try > 0 {
			// Let the winner of the race finish binding the device, so
			// LOOP_CTL_GET_FREE moves on to another one.
			time.Sleep(time.Duration(try) * time.Millisecond)
		}
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("attach %s: LOOP_CTL_GET_FREE: %w", abs, err)
		}
		dev, err := configure(n, &cfg)
		if err == nil {
			klog.V(4).InfoS("Attached loop device", "device", dev.Path, "backingFile", dev.BackingFile,
				"readOnly", dev.ReadOnly, "directIO", dev.DirectIO)
			return dev, nil
		}
		// EBUSY: another attacher bound the device first. ENXIO/ENOENT: it
		// was removed (LOOP_CTL_REMOVE) between GET_FREE and open.
		if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			klog.V(5).InfoS("Loop device taken, retrying", "device", devPathFor(n), "err", err)
			lastErr = err
			continue
		}
		return nil, fmt.Errorf("attach %s: %w", abs, err)
	}
	return nil, fmt.Errorf("attach %s: no free loop device after %d tries: %w", abs, attachTries, lastErr)
}

// configure binds the backing file in cfg to /dev/loopN and returns the device
// as the kernel reports it.
func configure(n int, cfg *unix.LoopConfig) (*Device, error) {
	path := devPathFor(n)
	// The device must be opened for writing: the kernel makes the loop device
	// read-only when the configuring descriptor is.
	fd, err := openLoopNumber(n, unix.O_RDWR)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)

	err = unix.IoctlLoopConfigure(fd, cfg)
	if errors.Is(err, unix.EINVAL) && cfg.Info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 {
		// Some kernels refuse direct I/O outright instead of silently falling
		// back to buffered I/O (which is what current kernels do; the flags
		// read back below tell). Retry on the same device without it.
		klog.V(4).InfoS("Kernel refused direct I/O for loop device, retrying without", "device", path)
		cfg.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
		err = unix.IoctlLoopConfigure(fd, cfg)
	}
	if err != nil {
		return nil, fmt.Errorf("LOOP_CONFIGURE %s: %w", path, err)
	}
	dev, err := deviceFromFd(fd)
	if err != nil {
		// Do not leave a device behind that the caller does not know about.
		if cerr := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); cerr != nil {
			klog.ErrorS(cerr, "Failed to detach loop device after failed attach", "device", path)
		}
		return nil, fmt.Errorf("%s: read back status: %w", path, err)
	}
	return dev, nil
}

// setFileName stores name in lo_file_name for humans (losetup shows it when
// sysfs is unavailable). The kernel forces the last byte to NUL, so 63 bytes
// are kept, cut at a UTF-8 character boundary.
func setFileName(info *unix.LoopInfo64, name string) {
	limit := len(info.File_name) - 1
	if len(name) > limit {
		cut := limit
		for cut > 0 && !utf8.RuneStart(name[cut]) {
			cut--
		}
		name = name[:cut]
	}
	copy(info.File_name[:], name)
}

// Find returns the device backed by exactly this file, matching (st_dev,
// st_ino) against lo_device/lo_inode of every attached device, so it still
// finds a device whose backing file was renamed. It returns an error wrapping
// ErrNotFound when no device matches or the file does not exist.
func Find(backingFile string) (*Device, error) {
	var st unix.Stat_t
	if err := unix.Stat(backingFile, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("find %s: %w: %w", backingFile, ErrNotFound, err)
		}
		return nil, fmt.Errorf("find %s: %w", backingFile, err)
	}
	d, err := findByID(fileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, "")
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", backingFile, err)
	}
	return d, nil
}

// FindOwned returns the device of owner (see Device.OwnedBy) backed by the
// file with this device and inode number, or an error wrapping ErrNotFound.
func FindOwned(dev, ino uint64, owner string) (*Device, error) {
	d, err := findByID(fileID{dev: dev, ino: ino}, owner)
	if err != nil {
		return nil, fmt.Errorf("find device of inode %d on %d:%d: %w", ino, unix.Major(dev), unix.Minor(dev), err)
	}
	return d, nil
}

// findByID finds the device backed by the file id; with an owner, only a
// device that owner owns.
func findByID(id fileID, owner string) (*Device, error) {
	devs, err := List()
	if err != nil {
		return nil, err
	}
	for i := range devs {
		if devs[i].BackingDev == id.dev && devs[i].Inode == id.ino && (owner == "" || devs[i].OwnedBy(owner)) {
			return &devs[i], nil
		}
	}
	return nil, ErrNotFound
}

// List returns every attached loop device (those with a backing_file in
// sysfs), sorted by Number.
func List() ([]Device, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	var devs []Device
	for _, e := range entries {
		num, ok := strings.CutPrefix(e.Name(), "loop")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(num)
		if err != nil || n < 0 {
			continue
		}
		// The "loop" attribute group exists only while the device is bound;
		// checking it first avoids opening the many idle devices.
		if _, err := os.Stat("/sys/block/" + e.Name() + "/loop/backing_file"); err != nil {
			continue
		}
		d, err := statNumber(n)
		if errors.Is(err, ErrNotFound) {
			continue // detached meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("list loop devices: %w", err)
		}
		devs = append(devs, *d)
	}
	slices.SortFunc(devs, func(a, b Device) int { return a.Number - b.Number })
	return devs, nil
}

// statNumber reads the status of /dev/loopN, or ErrNotFound if it is unbound.
func statNumber(n int) (*Device, error) {
	// O_RDONLY: closing a descriptor opened for writing makes udev rescan
	// the device.
	fd, err := openLoopNumber(n, unix.O_RDONLY)
	if err != nil {
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			return nil, ErrNotFound
		}
		return nil, err
	}
	defer unix.Close(fd)
	return deviceFromFd(fd)
}

// deviceFromFd builds a Device from an open loop device descriptor. It returns
// an error wrapping ErrNotFound when the device is not bound.
func deviceFromFd(fd int) (*Device, error) {
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("LOOP_GET_STATUS64: %w", ErrNotFound)
		}
		return nil, fmt.Errorf("LOOP_GET_STATUS64: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat loop device: %w", err)
	}
	d := &Device{
		Path:       devPathFor(int(info.Number)),
		Number:     int(info.Number),
		Inode:      info.Inode,
		BackingDev: info.Device,
		Rdev:       uint64(st.Rdev),
		ReadOnly:   info.Flags&unix.LO_FLAGS_READ_ONLY != 0,
		DirectIO:   info.Flags&unix.LO_FLAGS_DIRECT_IO != 0,
		Autoclear:  info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0,
		PartScan:   info.Flags&unix.LO_FLAGS_PARTSCAN != 0,
	}
	if tag, ok := strings.CutPrefix(unix.ByteSliceToString(info.File_name[:]), ownerPrefix); ok {
		d.Owner, d.Label, _ = strings.Cut(tag, "/")
	}
	d.BackingFile, d.Deleted, err = backingFile(d.Rdev, info)
	if err != nil {
		return nil, err
	}
	return d, nil
}

const deletedSuffix = " (deleted)"

// backingFile reads sysfs backing_file for the device rdev. The kernel prints
// it with d_path(), which appends " (deleted)" once the file is unlinked; that
// suffix is stripped unless the file really has such a name.
func backingFile(rdev uint64, info *unix.LoopInfo64) (name string, deleted bool, err error) {
	p := fmt.Sprintf("/sys/dev/block/%d:%d/loop/backing_file", unix.Major(rdev), unix.Minor(rdev))
	b, err := os.ReadFile(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", false, fmt.Errorf("read %s: %w", p, ErrNotFound) // detached meanwhile
	case err != nil:
		// d_path() fails for paths longer than a page; fall back to the
		// (truncated) name given at attach time rather than failing List.
		return unix.ByteSliceToString(info.File_name[:]), false, nil
	}
	name = strings.TrimSuffix(string(b), "\n")
	trimmed, ok := strings.CutSuffix(name, deletedSuffix)
	if !ok {
		return name, false, nil
	}
	var st unix.Stat_t
	if unix.Stat(name, &st) == nil && uint64(st.Dev) == info.Device && uint64(st.Ino) == info.Inode {
		return name, false, nil // literally named "... (deleted)"
	}
	return trimmed, true, nil
}

// openLoopNumber opens /dev/loopN, creating the node from sysfs when it is
// missing. That happens in containers whose /dev is a private tmpfs rather
// than devtmpfs: the kernel creates devices that have no node there.
func openLoopNumber(n int, flags int) (int, error) {
	path := devPathFor(n)
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		if err = mknodLoop(n); err == nil {
			fd, err = unix.Open(path, flags|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	return fd, nil
}

func mknodLoop(n int) error {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/dev", n))
	if err != nil {
		return unix.ENOENT // no such device in the kernel either
	}
	rdev, err := parseMajorMinor(strings.TrimSpace(string(b)))
	if err != nil {
		return err
	}
	err = unix.Mknod(devPathFor(n), unix.S_IFBLK|0o660, int(rdev))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mknod %s: %w", devPathFor(n), err)
	}
	return nil
}

// parseMajorMinor parses "MAJ:MIN" as used by sysfs dev files and mountinfo.
func parseMajorMinor(s string) (uint64, error) {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return 0, fmt.Errorf("bad major:minor %q", s)
	}
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("bad major:minor %q", s)
	}
	return unix.Mkdev(uint32(ma), uint32(mi)), nil
}

// openDevPath validates devPath and opens it with flags, checking that the
// node really is a loop block device. A missing node or unbound device is reported
// as ErrNotFound.
func openDevPath(devPath string, flags int) (int, error) {
	if _, err := parseDevPath(devPath); err != nil {
		return -1, err
	}
	fd, err := unix.Open(devPath, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
			return -1, fmt.Errorf("open %s: %w: %w", devPath, ErrNotFound, err)
		}
		return -1, fmt.Errorf("open %s: %w", devPath, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("stat %s: %w", devPath, err)
	}
	if err := checkLoopNode(devPath, &st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func checkLoopNode(devPath string, st *unix.Stat_t) error {
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(uint64(st.Rdev)) != loopMajor {
		return fmt.Errorf("%s is not a loop block device", devPath)
	}
	return nil
}

// requireBound returns an error wrapping ErrNotFound if fd's device is unbound.
func requireBound(fd int, devPath string) error {
	_, err := unix.IoctlLoopGetStatus64(fd)
	if errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("%s: %w", devPath, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("%s: LOOP_GET_STATUS64: %w", devPath, err)
	}
	return nil
}

// Detach detaches devPath (LOOP_CLR_FD) and waits for the kernel to release
// the backing file. A device that is not attached, or does not exist, is not
// an error. A mounted device, or one claimed exclusively by someone else, is
// left untouched and an error wrapping ErrBusy is returned; so is a device
// still held open by another process after LOOP_CLR_FD (the kernel then
// detaches it on that process's last close).
func Detach(devPath string) error {
	if _, err := parseDevPath(devPath); err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(devPath, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("detach: stat %s: %w", devPath, err)
	}
	if err := checkLoopNode(devPath, &st); err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	rdev := uint64(st.Rdev)

	// LOOP_CLR_FD on a mounted device would only arm autoclear, so the
	// device would silently vanish at unmount. Refuse instead.
	mp, err := mountedAt(rdev, devPath)
	if err != nil {
		return fmt.Errorf("detach %s: %w", devPath, err)
	}
	if mp != "" {
		return fmt.Errorf("detach %s: mounted at %s: %w", devPath, mp, ErrBusy)
	}

	var bound bool
	delay := detachBackoff
	for try := 1; ; try++ {
		bound, err = clearFd(devPath, rdev)
		if err == nil || !errors.Is(err, unix.EBUSY) || try == detachTries {
			break
		}
		klog.V(5).InfoS("Loop device busy, retrying detach", "device", devPath, "err", err)
		time.Sleep(delay)
		delay *= 2
	}
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("detach %s: %w: %w", devPath, ErrBusy, err)
		}
		return fmt.Errorf("detach %s: %w", devPath, err)
	}
	if !bound {
		return nil
	}
	if err := waitUnbound(rdev, teardownTimeout); err != nil {
		return fmt.Errorf("detach %s: %w", devPath, err)
	}
	klog.V(4).InfoS("Detached loop device", "device", devPath)
	return nil
}

// clearFd issues LOOP_CLR_FD through an exclusive open. O_EXCL fails with
// EBUSY while a filesystem (in any mount namespace, including btrfs whose
// mountinfo major:minor is anonymous), device-mapper or mkfs has claimed the
// device, and while we hold it nobody can mount it. It reports whether the
// device was bound.
func clearFd(devPath string, rdev uint64) (bool, error) {
	fd, err := unix.Open(devPath, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
			return false, nil
		}
		return false, fmt.Errorf("open %s: %w", devPath, err)
	}
	// The final close happens here; when we are the last opener the kernel
	// tears the device down synchronously before close returns.
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", devPath, err)
	}
	if uint64(st.Rdev) != rdev {
		return false, fmt.Errorf("%s changed while detaching", devPath)
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil {
		if errors.Is(err, unix.ENXIO) {
			return false, nil // not attached
		}
		return false, fmt.Errorf("LOOP_CLR_FD: %w", err)
	}
	return true, nil
}

// waitUnbound waits until the loop device rdev has released its backing file.
func waitUnbound(rdev uint64, timeout time.Duration) error {
	p := fmt.Sprintf("/sys/dev/block/%d:%d/loop", unix.Major(rdev), unix.Minor(rdev))
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still open by another process after %v, the kernel will detach it on last close: %w",
				timeout, ErrBusy)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ClearAutoclear clears LO_FLAGS_AUTOCLEAR on devPath, which must be the
// bound device dev (checked by its dev_t): Spool's devices outlive every
// close. The kernel lets LOOP_SET_STATUS64 clear no other flag Attach does
// not set (partition scanning stays once it was turned on).
func ClearAutoclear(devPath string, rdev uint64) error {
	fd, err := openDevPath(devPath, unix.O_RDONLY)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || uint64(st.Rdev) != rdev {
		return fmt.Errorf("%s: %w: not the device %d:%d", devPath, ErrNotFound, unix.Major(rdev), unix.Minor(rdev))
	}
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", devPath, err)
	}
	if info.Flags&unix.LO_FLAGS_AUTOCLEAR == 0 {
		return nil
	}
	info.Flags &^= unix.LO_FLAGS_AUTOCLEAR
	if err := unix.IoctlLoopSetStatus64(fd, info); err != nil {
		return fmt.Errorf("LOOP_SET_STATUS64 %s: %w", devPath, err)
	}
	return nil
}

// SetCapacity tells the kernel the backing file changed size
// (LOOP_SET_CAPACITY) and returns the new size of the block device in bytes.
func SetCapacity(devPath string) (int64, error) {
	// Read-only open: the ioctl then needs CAP_SYS_ADMIN (which the node
	// plugin has), but closing a descriptor opened for writing would make
	// udev rescan the device.
	fd, err := openDevPath(devPath, unix.O_RDONLY)
	if err != nil {
		return 0, fmt.Errorf("set capacity: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
		if errors.Is(err, unix.ENXIO) {
			return 0, fmt.Errorf("set capacity %s: %w", devPath, ErrNotFound)
		}
		return 0, fmt.Errorf("set capacity %s: LOOP_SET_CAPACITY: %w", devPath, err)
	}
	size, err := blkGetSize64(fd)
	if err != nil {
		return 0, fmt.Errorf("set capacity %s: %w", devPath, err)
	}
	klog.V(4).InfoS("Updated loop device capacity", "device", devPath, "size", size)
	return size, nil
}

// Size returns the size of the block device in bytes, or an error wrapping
// ErrNotFound if it is not attached.
func Size(devPath string) (int64, error) {
	fd, err := openDevPath(devPath, unix.O_RDONLY)
	if err != nil {
		return 0, fmt.Errorf("size: %w", err)
	}
	defer unix.Close(fd)
	// An unbound loop device reports size 0 rather than an error.
	if err := requireBound(fd, devPath); err != nil {
		return 0, fmt.Errorf("size: %w", err)
	}
	size, err := blkGetSize64(fd)
	if err != nil {
		return 0, fmt.Errorf("size %s: %w", devPath, err)
	}
	return size, nil
}

func blkGetSize64(fd int) (int64, error) {
	// x/sys has no uint64 getter; IoctlGetInt would be wrong on 32-bit.
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", errno)
	}
	return int64(size), nil
}

// Per-file locks serialising Attach of the same file within this process.
var (
	fileLocksMu sync.Mutex
	fileLocks   = map[fileID]*fileLock{}
)

type fileLock struct {
	mu   sync.Mutex
	refs int
}

func lockFile(id fileID) (unlock func()) {
	fileLocksMu.Lock()
	l := fileLocks[id]
	if l == nil {
		l = &fileLock{}
		fileLocks[id] = l
	}
	l.refs++
	fileLocksMu.Unlock()

	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		fileLocksMu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(fileLocks, id)
		}
		fileLocksMu.Unlock()
	}
}
