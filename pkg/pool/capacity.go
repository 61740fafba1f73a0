package pool

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/spool-csi/spool/pkg/imagecopy"
	"github.com/spool-csi/spool/pkg/size"
)

// Capacity is the pool's space, counted by provisioned bytes: a thin volume
// counts with its full size from the moment it exists, so volumes that are
// filled later never run the pool out of space.
type Capacity struct {
	// Total is the pool's capacity: the configured capacity, or the size of
	// its filesystem.
	Total int64
	// Provisioned is the sum of the sizes of all volumes.
	Provisioned int64
	// Snapshots is what the snapshots count against the capacity: the bytes
	// their images occupy. A copied snapshot holds them already; a
	// reflinked one shares them with its volume until the volume is
	// written, and then needs them: counting them keeps the pool's promise
	// that a thick volume never meets ENOSPC.
	Snapshots int64
	// Allocated is what the images (of volumes, and of snapshots that are
	// copies) really occupy on disk.
	Allocated int64
	// Available is what a new volume may still provision: Total minus
	// Provisioned, and never more than the filesystem could still hold if
	// every volume were filled.
	Available int64

	// Unbacked is how many of the provisioned bytes the filesystem could no
	// longer hold if every volume were filled: more than zero once something
	// other than Spool filled the filesystem.
	Unbacked int64

	// limit is min(Total, free space + Allocated), before subtracting
	// Provisioned.
	limit int64
}

// Capacity computes the pool's capacity now.
func (p *Pool) Capacity() (Capacity, error) {
	p.refreshShared()
	p.refreshSnapshots()
	var st unix.Statfs_t
	if err := unix.Statfs(p.root, &st); err != nil {
		return Capacity{}, fmt.Errorf("statfs %s: %w", p.root, err)
	}
	fsTotal := int64(st.Blocks) * st.Bsize
	fsFree := int64(st.Bavail) * st.Bsize

	var c Capacity
	p.mu.Lock()
	images := make([]string, 0, len(p.vols))
	for tok := range p.vols {
		images = append(images, tok)
	}
	c.Provisioned = p.provisioned
	var copies int64
	c.Snapshots, copies = p.snapshotCharges()
	reserved := p.reserved
	p.mu.Unlock()
	c.Allocated = copies

	for _, tok := range images {
		c.Allocated += p.allocated(tok)
	}
	c.Total = fsTotal
	if p.capLimit > 0 {
		c.Total = p.capLimit
	}
	// The pool can never use more than its filesystem's free space plus what
	// its images already hold.
	c.limit = min(c.Total, fsFree+c.Allocated)
	c.Available = max(c.limit-c.Provisioned-c.Snapshots-reserved, 0)
	c.Unbacked = max(c.Provisioned+c.Snapshots-(fsFree+c.Allocated), 0)
	return c, nil
}

// snapshotCharges sums what the snapshots count against the capacity, and
// the part of it that copies (not reflinks) occupy on their own; p.mu is
// held.
func (p *Pool) snapshotCharges() (all, copies int64) {
	for _, s := range p.snaps {
		all += s.charge
		if s.Method != string(imagecopy.Reflink) {
			copies += s.charge
		}
	}
	return all, copies
}

// allocatedBytes returns the bytes a file occupies on disk.
func allocatedBytes(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Blocks * 512, nil
}

// MetadataReserve is the free space a snapshot may not take: with it, a full
// pool still has room for the metadata writes that detach, unstage and
// delete volumes.
const MetadataReserve = 64 << 20

// reserveSnapshot sets aside, while a snapshot of the open image src is
// made, the capacity the snapshot will count (what src occupies now), and
// refuses with ResourceExhausted when the pool cannot hold it or the
// filesystem would be left with less than MetadataReserve free.
func (p *Pool) reserveSnapshot(src *os.File, srcID string) (release func(), err error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(src.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat the image of %s: %w", srcID, err)
	}
	need := st.Blocks * 512
	var fs unix.Statfs_t
	if err := unix.Statfs(p.root, &fs); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", p.root, err)
	}
	if free := int64(fs.Bavail) * fs.Bsize; free-need < MetadataReserve {
		return nil, errorf(ErrExhausted, "pool %s: a snapshot of %s needs %s and would leave less than %s free (%s free): the rest is kept for detaching and deleting volumes",
			p.name, srcID, size.Format(need), size.Format(MetadataReserve), size.Format(free))
	}
	release, err = p.reserve(need)
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", srcID, err)
	}
	return release, nil
}

// allocated returns the bytes the volume's files occupy on disk.
func (p *Pool) allocated(token string) int64 {
	var n int64
	for _, f := range []string{imageFile, metaFile} {
		fi, err := os.Lstat(p.volumeDir(token) + "/" + f)
		if err != nil {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		}
	}
	return n
}

// AllocatedBytes returns the bytes the volume's image occupies on disk.
func (p *Pool) AllocatedBytes(token string) int64 { return p.allocated(token) }

// reserve sets aside n bytes of the pool's capacity for a volume being
// created or grown; release gives them back once the volume's own size
// counts them. The filesystem's free space settles most requests without
// looking at the images (what they occupy only ever raises the limit);
// only a pool near its limit sums what its images occupy.
func (p *Pool) reserve(n int64) (release func(), err error) {
	p.refreshShared() // count what other controllers provisioned
	var st unix.Statfs_t
	if err := unix.Statfs(p.root, &st); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", p.root, err)
	}
	total := int64(st.Blocks) * st.Bsize
	if p.capLimit > 0 {
		total = p.capLimit
	}
	limit := min(total, int64(st.Bavail)*st.Bsize)
	var avail int64
	for attempt := range 2 {
		if attempt == 1 {
			c, err := p.Capacity()
			if err != nil {
				return nil, err
			}
			limit = c.limit
		}
		p.mu.Lock()
		snaps, _ := p.snapshotCharges()
		if avail = limit - p.provisioned - snaps - p.reserved; n <= avail {
			p.reserved += n
			p.mu.Unlock()
			return func() {
				p.mu.Lock()
				p.reserved -= n
				p.mu.Unlock()
			}, nil
		}
		p.mu.Unlock()
	}
	return nil, errorf(ErrExhausted, "pool %s cannot hold %s more: %s available (capacity %s)",
		p.name, size.Format(n), size.Format(max(avail, 0)), size.Format(total))
}
