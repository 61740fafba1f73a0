package driver

import (
	"os"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/fscrypt"
	"github.com/spool-csi/spool/pkg/loop"
	"github.com/spool-csi/spool/pkg/pool"
)

// LoopDevices is the node service's edge to loop devices. The real one is
// pkg/loop; unit tests use a fake.
type LoopDevices interface {
	// Attach attaches an image the pool opened and checked.
	Attach(image *os.File, opts loop.Options) (*loop.Device, error)
	// Find finds the device of owner backed by the image with this
	// identity (loop.Device.OwnedBy).
	Find(image pool.ImageID, owner string) (*loop.Device, error)
	List() ([]loop.Device, error)
	Detach(devPath string) error
	Size(devPath string) (int64, error)
	// ClearAutoclear clears the autoclear flag of the device devPath with
	// dev_t rdev (a pod with raw access can set it).
	ClearAutoclear(devPath string, rdev uint64) error
	SetCapacity(devPath string) (int64, error)
}

// Mounter is the node service's edge to filesystems and the mount table. The
// real one is pkg/fs; unit tests use a fake.
type Mounter interface {
	Probe(device string) (string, error)
	FormatAndMount(device, target, fsType string, options, formatOptions []string) error
	MountFormatted(device, target, fsType string, options []string) error
	BindMount(source, target string, ro bool) error
	Unmount(target string) error
	Mounts() ([]fs.MountInfo, error)
	Stats(path string) (fs.Stats, error)
	NeedResize(devicePath, mountPath, fsType string) (bool, error)
	Resize(devicePath, mountPath string) error
	GrowUnmounted(device, fsType string) (bool, error)
	NewUUID(device, fsType string) error
	Freeze(path string) (thaw func() error, err error)
	Thaw(path string) (bool, error)
}

// Crypt is the node service's edge to filesystem encryption. The real one
// is pkg/fscrypt; unit tests use a fake.
type Crypt interface {
	// Unlock adds key to the filesystem mounted at root and checks (or,
	// with create, sets) the encryption of its directory dir.
	Unlock(root, dir string, key fscrypt.Key, create bool) (fscrypt.Identifier, error)
	// Lock removes the key of the directory dir from the filesystem.
	Lock(root, dir string) (id fscrypt.Identifier, busy bool, err error)
}

// Kernel bundles the node's edges.
type Kernel struct {
	Loops   LoopDevices
	Mounter Mounter
	Crypt   Crypt
}

type realCrypt struct{}

func (realCrypt) Unlock(root, dir string, key fscrypt.Key, create bool) (fscrypt.Identifier, error) {
	return fscrypt.Unlock(root, dir, key, create)
}
func (realCrypt) Lock(root, dir string) (fscrypt.Identifier, bool, error) {
	return fscrypt.Lock(root, dir)
}

type realLoops struct{}

func (realLoops) Attach(image *os.File, opts loop.Options) (*loop.Device, error) {
	return loop.AttachFile(image, opts)
}
func (realLoops) Find(image pool.ImageID, owner string) (*loop.Device, error) {
	return loop.FindOwned(image.Dev, image.Ino, owner)
}
func (realLoops) List() ([]loop.Device, error)       { return loop.List() }
func (realLoops) Detach(devPath string) error        { return loop.Detach(devPath) }
func (realLoops) Size(devPath string) (int64, error) { return loop.Size(devPath) }
func (realLoops) ClearAutoclear(devPath string, rdev uint64) error {
	return loop.ClearAutoclear(devPath, rdev)
}
func (realLoops) SetCapacity(devPath string) (int64, error) {
	return loop.SetCapacity(devPath)
}

// realMounter adds the package-level pieces of pkg/fs to its Mounter.
type realMounter struct{ *fs.Mounter }

func (realMounter) Freeze(path string) (func() error, error) { return fs.Freeze(path) }
func (realMounter) Thaw(path string) (bool, error)           { return fs.Thaw(path) }

// RealKernel returns the edges backed by the running kernel.
func RealKernel() Kernel {
	return Kernel{Loops: realLoops{}, Mounter: realMounter{fs.New()}, Crypt: realCrypt{}}
}
