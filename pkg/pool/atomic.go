package pool

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/faults"
	"github.com/spool-csi/spool/pkg/volid"
)

// writeFileAtomic replaces path with data so that a crash leaves either the
// old or the new content: temp file, fsync, rename, fsync of the directory.
// Only for paths that are not inside a pool's directories (the identity
// file of a pool being made); the pool's own files go through writeAtomic.
func writeFileAtomic(path string, data []byte) error {
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("opening the directory of %s: %w", path, err)
	}
	defer dir.Close()
	return writeAtomicAt(dir, filepath.Base(path), data)
}

// writeAtomic is writeFileAtomic for rel, a file of the pool: its directory
// is opened beneath the pool root (never through a link) and the temp file
// is made and renamed relative to that descriptor, so a volume directory
// replaced by a link cannot make Spool write, or replace, a file elsewhere.
func (p *Pool) writeAtomic(rel string, data []byte) error {
	dir, err := p.openBeneath(filepath.Dir(rel), unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer dir.Close()
	return writeAtomicAt(dir, filepath.Base(rel), data)
}

// writeAtomicAt writes name in the open directory dir: temp file (never
// following a link), fsync, rename, fsync of the directory.
func writeAtomicAt(dir *os.File, name string, data []byte) error {
	dfd := int(dir.Fd())
	var tmp string
	var fd int
	for try := 0; ; try++ {
		suffix, err := volid.NewToken()
		if err != nil {
			return err
		}
		tmp = "." + name + ".tmp-" + suffix
		fd, err = unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) || try == 3 {
			return fmt.Errorf("creating a temp file for %s in %s: %w", name, dir.Name(), err)
		}
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), tmp))
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = unix.Unlinkat(dfd, tmp, 0)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", f.Name(), err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", f.Name(), err)
	}
	faults.Point("meta-temp-written")
	if err := unix.Renameat(dfd, tmp, dfd, name); err != nil {
		return fmt.Errorf("renaming %s to %s in %s: %w", tmp, name, dir.Name(), err)
	}
	ok = true
	if err := dir.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir.Name(), err)
	}
	return nil
}

// syncDir makes a rename or create inside dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening directory %s: %w", dir, err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// scratch is an object directory being built under .tmp, opened beneath the
// pool root: everything in it is made relative to its descriptor.
type scratch struct {
	p   *Pool
	rel string   // .tmp/<name>
	dir *os.File // the directory itself
}

// newScratch makes .tmp/name (mkdirat in .tmp opened beneath the root).
func (p *Pool) newScratch(name string) (*scratch, error) {
	tmp, err := p.openBeneath(tmpDir, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer tmp.Close()
	if err := unix.Mkdirat(int(tmp.Fd()), name, 0o750); err != nil {
		return nil, fmt.Errorf("pool %s: creating %s: %w", p.name, filepath.Join(tmpDir, name), err)
	}
	rel := filepath.Join(tmpDir, name)
	dir, err := p.openBeneath(rel, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		_ = unix.Unlinkat(int(tmp.Fd()), name, unix.AT_REMOVEDIR)
		return nil, err
	}
	return &scratch{p: p, rel: rel, dir: dir}, nil
}

// create makes a new file in the scratch directory.
func (s *scratch) create(name string) (*os.File, error) {
	fd, err := unix.Openat(int(s.dir.Fd()), name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Join(s.rel, name), err)
	}
	return os.NewFile(uintptr(fd), filepath.Join(s.p.root, s.rel, name)), nil
}

// open opens a file of the scratch directory, never through a link.
func (s *scratch) open(name string, flags int) (*os.File, error) {
	fd, err := unix.Openat(int(s.dir.Fd()), name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", filepath.Join(s.rel, name), err)
	}
	return os.NewFile(uintptr(fd), filepath.Join(s.p.root, s.rel, name)), nil
}

// discard removes the scratch directory and what is in it.
func (s *scratch) discard() {
	_ = s.dir.Close()
	if err := s.p.removeBeneath(s.rel); err != nil {
		klog.ErrorS(err, "Could not remove a half-built object; the next start will", "pool", s.p.name, "path", s.rel)
	}
}

// commit writes meta as JSON into the scratch directory and renames it to
// final (relative to the pool root): from then on the object exists, whole.
// Nothing else sees the scratch directory, so the metadata file is written
// in place; the fsync of the directory makes its entries durable before the
// rename publishes them.
func (s *scratch) commit(final, metaName string, meta any) error {
	data, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding metadata: %w", err)
	}
	f, err := s.create(metaName)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := s.dir.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", s.rel, err)
	}
	faults.Point("commit-meta-written")
	if err := s.p.renameBeneath(s.rel, final); err != nil {
		return fmt.Errorf("renaming %s into place: %w", s.rel, err)
	}
	_ = s.dir.Close()
	parent, err := s.p.openBeneath(filepath.Dir(final), unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer parent.Close()
	if err := parent.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", filepath.Dir(final), err)
	}
	return nil
}
