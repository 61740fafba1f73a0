// Package extents answers which byte ranges of an image file hold data, and
// which ranges differ between two images, from the pool filesystem's extent
// maps (FIEMAP, else SEEK_DATA/SEEK_HOLE), reading contents only where the
// maps cannot tell. It serves changed block tracking (the CSI
// SnapshotMetadata service) over snapshot images.
package extents

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// BlockSize is the granularity of the ranges Delta reports: the block size
// of the filesystems Spool makes, and of the pool filesystems it runs on.
const BlockSize = 4096

// compareChunk is how much of each image Delta reads at once.
const compareChunk = 1 << 20

// Range is a byte range of an image.
type Range struct{ Offset, Length int64 }

// End is the offset just past the range.
func (r Range) End() int64 { return r.Offset + r.Length }

// Stats says how Delta reached its answer.
type Stats struct {
	// Method is "extents" when the pool filesystem mapped both images'
	// extents (FIEMAP), "seek" when it only told data from holes.
	Method string
	// SharedBytes were skipped because both images map them to the same
	// physical blocks (reflinked and not written since): unchanged.
	SharedBytes int64
	// ComparedBytes were read from each image and compared block by block:
	// data neither a shared extent nor a hole in both.
	ComparedBytes int64
	// ReportedBytes are the bytes of the ranges reported as changed.
	ReportedBytes int64
}

// extent is a range of a file that the filesystem maps: data, or (when
// unwritten) preallocated blocks that read as zeros. phys is its physical
// address on the filesystem's device, 0 when unknown.
type extent struct {
	off, end  int64
	phys      int64
	unwritten bool
}

// walker walks a file's data extents in ascending order, from FIEMAP where
// the filesystem has it, else from SEEK_DATA/SEEK_HOLE (no physical
// addresses).
type walker struct {
	f      *os.File
	size   int64 // nothing at or past size is looked at
	seek   bool  // FIEMAP is not supported: SEEK_DATA/SEEK_HOLE
	buf    []extent
	next   int64 // where the next batch starts
	done   bool  // no more extents after buf
	req    *fiemapRequest
	probed bool
}

// noFiemap makes walkers use SEEK_DATA/SEEK_HOLE, as on a filesystem
// without FIEMAP (tests).
var noFiemap = false

func newWalker(f *os.File, size int64) *walker {
	return &walker{f: f, size: size, seek: noFiemap}
}

// at returns the first data extent of the file that ends after pos (it may
// start before pos), or ok=false when there is none before the walker's
// size. Calls must not go back: pos never decreases.
func (w *walker) at(pos int64) (e extent, ok bool, err error) {
	for {
		for len(w.buf) > 0 && (w.buf[0].end <= pos || w.buf[0].unwritten) {
			w.buf = w.buf[1:]
		}
		if len(w.buf) > 0 {
			if w.buf[0].off >= w.size {
				return extent{}, false, nil
			}
			return w.buf[0], true, nil
		}
		if w.done {
			return extent{}, false, nil
		}
		if w.next < pos {
			w.next = pos
		}
		if w.next >= w.size {
			w.done = true
			continue
		}
		if err := w.fill(); err != nil {
			return extent{}, false, err
		}
	}
}

// fill reads the next batch of extents from w.next.
func (w *walker) fill() error {
	if !w.seek {
		if w.req == nil {
			w.req = new(fiemapRequest)
		}
		ext, last, err := fiemap(w.f, w.next, w.req)
		if errors.Is(err, errNoFiemap) && !w.probed {
			w.seek = true
			return w.fill()
		}
		w.probed = true
		if err != nil {
			return err
		}
		w.buf, w.done = ext, last
		if len(ext) > 0 {
			w.next = max(w.next, ext[len(ext)-1].end)
		}
		return nil
	}
	data, err := seek(w.f, w.next, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		w.done = true
		return nil
	}
	if errors.Is(err, unix.EINVAL) {
		// No SEEK_DATA either: all of the file may hold data.
		w.buf, w.done = []extent{{off: w.next, end: w.size}}, true
		return nil
	}
	if err != nil {
		return err
	}
	hole, err := seek(w.f, data, unix.SEEK_HOLE)
	if err != nil {
		return err
	}
	w.buf, w.next = []extent{{off: data, end: hole}}, hole
	return nil
}

func seek(f *os.File, off int64, whence int) (int64, error) {
	for {
		n, err := unix.Seek(int(f.Fd()), off, whence)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("seeking %s from %d: %w", f.Name(), off, err)
		}
		return n, nil
	}
}

// coalescer merges adjacent ranges before handing them on.
type coalescer struct {
	pending Range
	emit    func(Range) error
}

func (c *coalescer) add(r Range) error {
	if r.Length <= 0 {
		return nil
	}
	if c.pending.Length > 0 && c.pending.End() == r.Offset {
		c.pending.Length += r.Length
		return nil
	}
	if err := c.flush(); err != nil {
		return err
	}
	c.pending = r
	return nil
}

func (c *coalescer) flush() error {
	if c.pending.Length == 0 {
		return nil
	}
	r := c.pending
	c.pending = Range{}
	return c.emit(r)
}

// Allocated calls emit, in ascending order and merged where adjacent, for
// every range of f within [from, size) that may hold data: everything but
// holes and unwritten (preallocated, zero-reading) extents. Every non-zero
// byte of the file below size is in a reported range. The first range
// starts at from or later.
func Allocated(ctx context.Context, f *os.File, from, size int64, emit func(Range) error) error {
	w := newWalker(f, size)
	c := &coalescer{emit: emit}
	pos := from
	for pos < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, ok, err := w.at(pos)
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		r := Range{Offset: max(e.off, pos)}
		r.Length = min(e.end, size) - r.Offset
		if err := c.add(r); err != nil {
			return err
		}
		pos = r.End()
	}
	return c.flush()
}

// DeltaOptions tune Delta.
type DeltaOptions struct {
	// TrustExtents reports data that the two images map to different
	// physical blocks as changed without reading it. Set it when both
	// images are reflinks of one origin (snapshots of one volume on a pool
	// that reflinks): a block that differs physically was written between
	// them, so reading only confirms it, at the cost of two reads per
	// changed block. A block rewritten with the bytes it had is then
	// reported too. Data without a physical address (compressed, inline)
	// is still compared.
	TrustExtents bool
}

// Delta calls emit, in ascending order and merged where adjacent, for
// BlockSize-aligned ranges within [from, targetSize) that together cover
// every byte where target differs from base, base reading as zeros past
// baseSize (a volume expanded between the two). Writing target's bytes at
// every reported range onto a copy of base, extended to targetSize, gives
// target.
//
// Ranges both images map to the same physical blocks (a reflinked snapshot,
// not written since) are unchanged without being read; holes in both are
// unchanged. The rest is read from both and compared block by block, so
// that only blocks whose bytes differ are reported, unless opts.TrustExtents
// says that differing physical blocks are changes. On a pool that copies
// (ext4), that reads the data of both images.
func Delta(ctx context.Context, base, target *os.File, baseSize, targetSize, from int64, opts DeltaOptions, emit func(Range) error) (Stats, error) {
	var st Stats
	bw, tw := newWalker(base, min(baseSize, targetSize)), newWalker(target, targetSize)
	d := &differ{ctx: ctx, base: base, target: target, baseSize: baseSize, targetSize: targetSize,
		out: &coalescer{emit: emit}, stats: &st}
	pos := from - from%BlockSize
	for pos < targetSize {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		be, bok, err := bw.at(pos)
		if err != nil {
			return st, err
		}
		te, tok, err := tw.at(pos)
		if err != nil {
			return st, err
		}
		if !bok && !tok {
			break
		}
		// The next segment starts where the first of the two extents does
		// (or at pos, inside one) and ends at the nearest boundary of
		// either: within it each image is all data or all hole.
		start := int64(-1)
		for _, c := range []struct {
			ok bool
			e  extent
		}{{bok, be}, {tok, te}} {
			if c.ok && (start < 0 || c.e.off < start) {
				start = c.e.off
			}
		}
		start = max(start, pos)
		end := targetSize
		for _, c := range []struct {
			ok bool
			e  extent
		}{{bok, be}, {tok, te}} {
			if !c.ok {
				continue
			}
			for _, b := range []int64{c.e.off, c.e.end} {
				if b > start && b < end {
					end = b
				}
			}
		}
		inBase := bok && be.off <= start
		inTarget := tok && te.off <= start
		shared := inBase && inTarget && be.phys != 0 && te.phys != 0 &&
			be.phys+(start-be.off) == te.phys+(start-te.off)
		// Every side holding data here says where on the device it is.
		located := (!inBase || be.phys != 0) && (!inTarget || te.phys != 0)
		if shared {
			st.SharedBytes += end - start
		} else if err := d.add(start, end, !(opts.TrustExtents && located)); err != nil {
			return st, err
		}
		pos = end
	}
	if err := d.flush(); err != nil {
		return st, err
	}
	if err := d.out.flush(); err != nil {
		return st, err
	}
	st.Method = "extents"
	if bw.seek || tw.seek {
		st.Method = "seek"
	}
	return st, nil
}

// differ settles the ranges Delta could not settle from the extent maps
// alone: it gathers them into runs of adjacent blocks, and either compares
// a run block by block or reports it whole.
type differ struct {
	ctx                  context.Context
	base, target         *os.File
	baseSize, targetSize int64
	out                  *coalescer
	stats                *Stats
	run                  Range // blocks waiting to be settled
	compare              bool  // the run is compared (else reported whole)
	bbuf, tbuf           []byte
}

// add queues [start, end), widened to whole blocks, to be compared or
// reported whole. A run that overlaps the last one joins it; where one of
// the two is reported whole, so is the joined run (reporting more is never
// wrong).
func (d *differ) add(start, end int64, compare bool) error {
	start -= start % BlockSize
	if rem := end % BlockSize; rem != 0 {
		end += BlockSize - rem
	}
	end = min(end, d.targetSize)
	if d.run.Length > 0 {
		if start < d.run.End() || (start == d.run.End() && compare == d.compare) {
			d.run.Length = max(d.run.End(), end) - d.run.Offset
			d.compare = d.compare && compare
			return nil
		}
		if err := d.flush(); err != nil {
			return err
		}
	}
	d.run, d.compare = Range{Offset: start, Length: end - start}, compare
	return nil
}

// flush settles the queued run.
func (d *differ) flush() error {
	r := d.run
	d.run = Range{}
	if !d.compare {
		d.stats.ReportedBytes += r.Length
		return d.out.add(r)
	}
	if d.bbuf == nil && r.Length > 0 {
		d.bbuf, d.tbuf = make([]byte, compareChunk), make([]byte, compareChunk)
	}
	for off := r.Offset; off < r.End(); {
		if err := d.ctx.Err(); err != nil {
			return err
		}
		n := min(int64(compareChunk), r.End()-off)
		if err := readAt(d.target, d.tbuf[:n], off, d.targetSize); err != nil {
			return err
		}
		if err := readAt(d.base, d.bbuf[:n], off, d.baseSize); err != nil {
			return err
		}
		d.stats.ComparedBytes += n
		for b := int64(0); b < n; b += BlockSize {
			e := min(b+BlockSize, n)
			if !bytes.Equal(d.tbuf[b:e], d.bbuf[b:e]) {
				d.stats.ReportedBytes += e - b
				if err := d.out.add(Range{Offset: off + b, Length: e - b}); err != nil {
					return err
				}
			}
		}
		off += n
	}
	return nil
}

// readAt fills p from f at off; what lies at or past size, or past the end
// of the file, reads as zeros.
func readAt(f *os.File, p []byte, off, size int64) error {
	n := 0
	if off < size {
		want := int(min(int64(len(p)), size-off))
		var err error
		n, err = f.ReadAt(p[:want], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("reading %s at %d: %w", f.Name(), off, err)
		}
	}
	clear(p[n:])
	return nil
}
