package pool

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/volid"
)

// ErrUntrusted means an object found in a pool directory is not what Spool
// makes there: a symbolic link, a hard-linked or special file where an image
// belongs, a mount point, metadata that does not hold together. Whoever can
// write the pool directory (on a shared pool: anyone who can write the
// share) can plant such things; Spool reports them and leaves them alone.
var ErrUntrusted = errors.New("not what Spool makes in a pool")

// resolveBeneath keeps a path inside the pool: no "..", no absolute
// symlinks, no symlinks at all, no /proc magic links, no mount crossings.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// createMode is the mode of the files openBeneath creates.
const createMode = 0o600

// openBeneath opens rel, a path relative to the pool root, without leaving
// the pool: the root is opened afresh (a share remounted since the pool was
// opened is seen as it is now) and every element of rel is resolved beneath
// it by the kernel (openat2). Where openat2 is missing, each element is
// opened with O_NOFOLLOW and checked to be on the root's filesystem.
func (p *Pool) openBeneath(rel string, flags int) (*os.File, error) {
	root, err := unix.Open(p.root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("pool %s: opening %s: %w", p.name, p.root, err)
	}
	defer unix.Close(root)
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW), Resolve: resolveBeneath}
	if flags&unix.O_CREAT != 0 {
		// The files a pool creates this way (its lock files) are the
		// pool's own: 0600, like every file Spool makes in a pool. (Mode 0
		// made 0000 files that only root could open again: the second,
		// unprivileged controller of a shared pool could not.)
		how.Mode = createMode
	}
	fd, err := unix.Openat2(root, rel, &how)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		// No openat2 (Linux < 5.6), or a seccomp profile that predates it
		// and answers EPERM: the same checks, one element at a time. A
		// real permission error comes back from the walk as well.
		fd, err = openStepwise(root, rel, flags)
	}
	switch {
	case errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOTDIR):
		return nil, fmt.Errorf("pool %s: %s: %w (a symbolic link, a mount point or a file where a directory belongs)", p.name, rel, ErrUntrusted)
	case err != nil:
		return nil, &os.PathError{Op: "open", Path: filepath.Join(p.root, rel), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(p.root, rel)), nil
}

// openStepwise is openBeneath for kernels without openat2 (before 5.6).
func openStepwise(root int, rel string, flags int) (int, error) {
	var rootSt unix.Stat_t
	if err := unix.Fstat(root, &rootSt); err != nil {
		return -1, err
	}
	parts := strings.Split(filepath.Clean(rel), "/")
	dir, err := unix.Dup(root)
	if err != nil {
		return -1, err
	}
	for i, part := range parts {
		if part == ".." || part == "." || part == "" {
			unix.Close(dir)
			return -1, unix.EXDEV
		}
		f := unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
		if i == len(parts)-1 {
			f = flags | unix.O_NOFOLLOW | unix.O_CLOEXEC
		}
		fd, err := unix.Openat(dir, part, f, createMode)
		unix.Close(dir)
		if err != nil {
			return -1, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Dev != rootSt.Dev {
			unix.Close(fd)
			if err == nil {
				err = unix.EXDEV
			}
			return -1, err
		}
		dir = fd
	}
	return dir, nil
}

// checkImage verifies that f is what Spool makes as an image: a regular file
// with one link (a hard link would let someone else's file, or a file
// outside the pool, be attached, copied or grown as a volume).
func (p *Pool) checkImage(f *os.File, rel string) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("pool %s: stat %s: %w", p.name, rel, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("pool %s: %s: %w (not a regular file)", p.name, rel, ErrUntrusted)
	}
	if st.Nlink != 1 {
		return fmt.Errorf("pool %s: %s: %w (%d hard links)", p.name, rel, ErrUntrusted, st.Nlink)
	}
	return nil
}

// openImage opens an image by its path relative to the pool root and checks
// it (see checkImage).
func (p *Pool) openImage(rel string, flags int) (*os.File, error) {
	f, err := p.openBeneath(rel, flags)
	if err != nil {
		return nil, err
	}
	if err := p.checkImage(f, rel); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// OpenImage opens the image of the volume with this token, resolved beneath
// the pool root and checked to be a regular file with one link. The caller
// attaches, copies or grows the image through the returned file, so the
// checks hold for exactly what it uses. flags are open(2) access flags
// (unix.O_RDONLY, unix.O_RDWR, or unix.O_PATH just to identify it).
func (p *Pool) OpenImage(token string, flags int) (*os.File, error) {
	if !volid.IsToken(token) {
		return nil, fmt.Errorf("pool %s: invalid token %q", p.name, token)
	}
	return p.openImage(filepath.Join(volumesDir, token, imageFile), flags)
}

// ImageID identifies an image file independently of its path.
type ImageID struct{ Dev, Ino uint64 }

// ImageIDOf returns the identity of an open image.
func ImageIDOf(f *os.File) (ImageID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return ImageID{}, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	return ImageID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
}

// Images maps the identity of every volume image of the pool to its
// volume's token. It is how loop devices are matched to volumes: by the file
// that backs them, not by a path string (a symlinked pool directory or a
// node plugin container that sees the pool at another path still matches).
// Images that fail the checks of OpenImage are left out. The volumes are
// those of the index: identities need no metadata, so a shared pool's are
// not read again from the share (List would).
func (p *Pool) Images() map[ImageID]string {
	p.mu.Lock()
	tokens := make([]string, 0, len(p.vols))
	for tok := range p.vols {
		tokens = append(tokens, tok)
	}
	p.mu.Unlock()
	out := map[ImageID]string{}
	for _, tok := range tokens {
		f, err := p.OpenImage(tok, unix.O_PATH)
		if err != nil {
			continue
		}
		id, err := ImageIDOf(f)
		_ = f.Close()
		if err == nil {
			out[id] = tok
		}
	}
	return out
}

// removeDepth bounds how deep removeAt descends: Spool's own trees are two
// levels deep (.trash/<token>/disk.img).
const removeDepth = 8

// removeBeneath removes rel (a file, or a directory and everything in it)
// without following a link anywhere: the parent is opened beneath the pool
// root and everything below is removed relative to directory descriptors.
func (p *Pool) removeBeneath(rel string) error {
	parent, err := p.openBeneath(filepath.Dir(rel), unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer parent.Close()
	if err := removeAt(int(parent.Fd()), filepath.Base(rel), removeDepth); err != nil {
		return fmt.Errorf("pool %s: removing %s: %w", p.name, rel, err)
	}
	return nil
}

// removeAt removes name in the directory dir; a link is removed, never
// followed.
func removeAt(dir int, name string, depth int) error {
	err := unix.Unlinkat(dir, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) {
		return err
	}
	if depth == 0 {
		return fmt.Errorf("%s: %w (nested too deep)", name, ErrUntrusted)
	}
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), name)
	names, err := f.Readdirnames(-1)
	if err == nil {
		for _, n := range names {
			if err = removeAt(fd, n, depth-1); err != nil {
				break
			}
		}
	}
	_ = f.Close()
	if err != nil {
		return err
	}
	if err := unix.Unlinkat(dir, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

// renameBeneath renames from to to, both relative to the pool root, with
// both parents opened beneath it: a directory of the pool replaced by a link
// never moves anything out of the pool (or into it).
func (p *Pool) renameBeneath(from, to string) error {
	src, err := p.openBeneath(filepath.Dir(from), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := p.openBeneath(filepath.Dir(to), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer dst.Close()
	if err := unix.Renameat(int(src.Fd()), filepath.Base(from), int(dst.Fd()), filepath.Base(to)); err != nil {
		return &os.LinkError{Op: "rename", Old: filepath.Join(p.root, from), New: filepath.Join(p.root, to), Err: err}
	}
	return nil
}

// checkOwnDirs verifies that the pool's own directories are directories of
// the pool's filesystem, not links or mount points: every path Spool builds
// goes through them.
func (p *Pool) checkOwnDirs(dirs ...string) error {
	for _, d := range dirs {
		f, err := p.openBeneath(d, unix.O_PATH|unix.O_DIRECTORY)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		fi, err := f.Stat()
		_ = f.Close()
		if err != nil {
			return fmt.Errorf("pool %s: stat %s: %w", p.name, d, err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("pool %s: %s: %w (not a directory)", p.name, d, ErrUntrusted)
		}
	}
	return nil
}

// maxMetaBytes bounds a metadata file Spool reads: its own are a few KiB.
const maxMetaBytes = 1 << 20

// readBeneath reads a small file (metadata) of the pool, opened beneath the
// pool root: a link there is refused, not followed.
func (p *Pool) readBeneath(rel string) ([]byte, error) {
	f, err := p.openBeneath(rel, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("pool %s: %s: %w (not a regular file)", p.name, rel, ErrUntrusted)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxMetaBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxMetaBytes {
		return nil, fmt.Errorf("pool %s: %s: %w (larger than %d bytes)", p.name, rel, ErrUntrusted, maxMetaBytes)
	}
	return data, nil
}
