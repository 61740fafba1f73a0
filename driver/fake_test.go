package driver

import (
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/fscrypt"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
)

// fakeKernel stands in for loop devices and the mount table. It keeps a
// mount table of its own, so that the node service's verification logic
// (which mount belongs to which device) runs unchanged.
type fakeKernel struct {
	mu      sync.Mutex
	next    int
	devs    map[pool.ImageID]*loop.Device // by backing file
	mounts  []fs.MountInfo
	formats map[string]string // device -> filesystem
	// mountOpts are the options each filesystem mount was asked for, by
	// target (the mount table keeps only rw or ro, as the kernel shows).
	mountOpts map[string][]string
	// formatOpts are the mkfs options of each format, by device.
	formatOpts map[string][]string
	// policies are the fscrypt keys that encrypt each image's filesystem
	// (the directory's policy); keys are the keys added, by mount point;
	// cryptCalls is the order of Unlock, Lock and Unmount calls.
	policies   map[pool.ImageID]fscrypt.Identifier
	keys       map[string]fscrypt.Identifier
	cryptCalls []string
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{devs: map[pool.ImageID]*loop.Device{}, formats: map[string]string{}, mountOpts: map[string][]string{},
		formatOpts: map[string][]string{}, policies: map[pool.ImageID]fscrypt.Identifier{}, keys: map[string]fscrypt.Identifier{}}
}

func (k *fakeKernel) kernel() Kernel { return Kernel{Loops: k, Mounter: k, Crypt: k} }

// imageMountedAt returns the image of the filesystem mounted at root.
func (k *fakeKernel) imageMountedAt(root string) (pool.ImageID, bool) {
	for _, m := range k.mounts {
		if m.MountPoint != root || m.FsType == "devtmpfs" {
			continue
		}
		for id, d := range k.devs {
			if d.Number == m.Minor {
				return id, true
			}
		}
	}
	return pool.ImageID{}, false
}

// Unlock stands in for fscrypt.Unlock: the identifier is a hash of the key,
// the first unlock with create sets the image's policy, and the directory
// is made for real (NodePublish checks it).
func (k *fakeKernel) Unlock(root, dir string, key fscrypt.Key, create bool) (fscrypt.Identifier, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cryptCalls = append(k.cryptCalls, "unlock "+root)
	img, ok := k.imageMountedAt(root)
	if !ok {
		return fscrypt.Identifier{}, errors.New("nothing mounted at " + root)
	}
	sum := sha256.Sum256(key)
	var id fscrypt.Identifier
	copy(id[:], sum[:])
	have, set := k.policies[img]
	switch {
	case set && have != id:
		return fscrypt.Identifier{}, fscrypt.ErrWrongKey
	case !set && !create:
		return fscrypt.Identifier{}, fscrypt.ErrNotEncrypted
	case !set:
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return id, err
		}
		k.policies[img] = id
	}
	k.keys[root] = id
	return id, nil
}

func (k *fakeKernel) Lock(root, _ string) (fscrypt.Identifier, bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cryptCalls = append(k.cryptCalls, "lock "+root)
	id := k.keys[root]
	delete(k.keys, root)
	return id, false, nil
}

func (k *fakeKernel) Attach(f *os.File, opts loop.Options) (*loop.Device, error) {
	id, err := pool.ImageIDOf(f)
	if err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if d, ok := k.devs[id]; ok {
		c := *d
		return &c, loop.ErrAlreadyAttached
	}
	n := k.next
	k.next++
	d := &loop.Device{Path: "/dev/loop" + strconv.Itoa(n), Number: n, BackingFile: f.Name(), BackingDev: id.Dev, Inode: id.Ino,
		Rdev: unix.Mkdev(7, uint32(n)), ReadOnly: opts.ReadOnly, DirectIO: opts.DirectIO, Owner: opts.Owner}
	k.devs[id] = d
	c := *d
	return &c, nil
}

func (k *fakeKernel) ClearAutoclear(devPath string, _ uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, d := range k.devs {
		if d.Path == devPath {
			d.Autoclear = false
			return nil
		}
	}
	return loop.ErrNotFound
}

// attachPath attaches the file at path, as a test's own setup would.
func (k *fakeKernel) attachPath(path string) (*loop.Device, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return k.Attach(f, loop.Options{})
}

func (k *fakeKernel) Find(id pool.ImageID, owner string) (*loop.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if d, ok := k.devs[id]; ok && d.OwnedBy(owner) {
		c := *d
		return &c, nil
	}
	return nil, loop.ErrNotFound
}

func (k *fakeKernel) List() ([]loop.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []loop.Device
	for _, d := range k.devs {
		out = append(out, *d)
	}
	return out, nil
}

func (k *fakeKernel) Detach(devPath string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for f, d := range k.devs {
		if d.Path == devPath {
			for _, m := range k.mounts {
				if fs.IsDeviceMount(m, d.Path, d.Rdev) {
					return loop.ErrBusy
				}
			}
			delete(k.devs, f)
		}
	}
	return nil
}

func (k *fakeKernel) Size(string) (int64, error)        { return 64 << 20, nil }
func (k *fakeKernel) SetCapacity(string) (int64, error) { return 64 << 20, nil }

func (k *fakeKernel) NeedResize(string, string, string) (bool, error) { return false, nil }
func (k *fakeKernel) Resize(string, string) error                     { return nil }
func (k *fakeKernel) GrowUnmounted(string, string) (bool, error)      { return false, nil }
func (k *fakeKernel) NewUUID(string, string) error                    { return nil }

func (k *fakeKernel) Thaw(string) (bool, error) { return false, nil }

func (k *fakeKernel) Freeze(string) (func() error, error) {
	return func() error { return nil }, nil
}

func (k *fakeKernel) attached() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.devs)
}

func (k *fakeKernel) devByPath(p string) *loop.Device {
	for _, d := range k.devs {
		if d.Path == p {
			return d
		}
	}
	return nil
}

func (k *fakeKernel) Probe(device string) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.formats[device], nil
}

func (k *fakeKernel) FormatAndMount(device, target, fsType string, options, formatOptions []string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devByPath(device)
	if d == nil {
		return errors.New("no such device")
	}
	if k.formats[device] == "" {
		k.formats[device] = fsType
		k.formatOpts[device] = formatOptions
	}
	k.mounts = append(k.mounts, fs.MountInfo{Major: 7, Minor: d.Number, Root: "/", MountPoint: target, FsType: fsType, MountOptions: rwOpt(options)})
	k.mountOpts[target] = append([]string(nil), options...)
	return nil
}

func (k *fakeKernel) MountFormatted(device, target, fsType string, options []string) error {
	return k.FormatAndMount(device, target, fsType, options, nil)
}

func (k *fakeKernel) BindMount(source, target string, ro bool) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	opts := []string{"rw"}
	if ro {
		opts = []string{"ro"}
	}
	if d := k.devByPath(source); d != nil {
		k.mounts = append(k.mounts, fs.MountInfo{Major: 0, Minor: 5, Root: "/" + filepath.Base(source), MountPoint: target, FsType: "devtmpfs", MountOptions: opts})
		return nil
	}
	for i := len(k.mounts) - 1; i >= 0; i-- {
		m := k.mounts[i]
		if rel, err := filepath.Rel(m.MountPoint, source); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			m.Root = filepath.Join(m.Root, rel)
			m.MountPoint, m.MountOptions = target, opts
			k.mounts = append(k.mounts, m)
			return nil
		}
	}
	return errors.New("bind source is not mounted")
}

func (k *fakeKernel) Unmount(target string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cryptCalls = append(k.cryptCalls, "unmount "+target)
	// The encrypted directory Unlock made lived in the filesystem.
	_ = os.Remove(filepath.Join(target, encryptedDir))
	for i := len(k.mounts) - 1; i >= 0; i-- {
		if k.mounts[i].MountPoint == target {
			k.mounts = append(k.mounts[:i], k.mounts[i+1:]...)
			return nil
		}
	}
	return errors.New("not mounted")
}

func (k *fakeKernel) Mounts() ([]fs.MountInfo, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]fs.MountInfo(nil), k.mounts...), nil
}

func (k *fakeKernel) Stats(string) (fs.Stats, error) {
	return fs.Stats{TotalBytes: 64 << 20, AvailableBytes: 60 << 20, UsedBytes: 4 << 20, TotalInodes: 100, FreeInodes: 90, UsedInodes: 10}, nil
}

func rwOpt(opts []string) []string {
	for _, o := range opts {
		if o == "ro" {
			return []string{"ro"}
		}
	}
	return []string{"rw"}
}
