// Package pool is the only code that knows the on-disk layout of a Spool
// pool. A pool directory alone is enough to recover every volume:
//
//	<root>/spool-pool.json          pool identity (name, id), written once
//	<root>/.lock                    flock held by the spool process serving the pool
//	                                (shared pools: held shared by every controller)
//	<root>/.create.lock             shared pools: flock around committing a new name
//	<root>/volumes/<token>/.lock    shared pools: flock around every metadata update
//	<root>/nodes/<node>.json        shared pools: a node plugin that has the pool mounted
//	<root>/volumes/<token>/disk.img the volume image (sparse, or preallocated)
//	<root>/volumes/<token>/volume.json  the volume's metadata, replaced atomically
//	<root>/snapshots/<token>/disk.img  a snapshot's read-only image
//	<root>/snapshots/<token>/snapshot.json
//	<root>/groups/<token>/group.json  a group snapshot: the IDs of its member snapshots
//	<root>/.tmp/                    objects being built; renamed into place when whole
//	<root>/.trash/                  objects being deleted
//
// A crash leaves either nothing or a whole volume: Open removes what .tmp and
// .trash still hold.
package pool

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

const (
	identityFile = "spool-pool.json"
	lockFile     = ".lock"
	volumesDir   = "volumes"
	tmpDir       = ".tmp"
	trashDir     = ".trash"
	metaFile     = "volume.json"
	imageFile    = "disk.img"
	snapshotsDir = "snapshots"
	snapshotMeta = "snapshot.json"
	groupsDir    = "groups"
	groupMeta    = "group.json"
)

// Spec is a pool as configured on the command line:
// NAME=DIR[,capacity=SIZE][,shared[,id=POOLID]].
type Spec struct {
	Name string
	Dir  string
	// Capacity caps the bytes the pool may provision; 0 means the size of
	// the filesystem that holds Dir.
	Capacity int64
	// Existing makes Open refuse a directory that is not a pool yet,
	// creating nothing, instead of initialising a new pool there: an
	// operator's mistyped directory must not become an empty pool.
	Existing bool
	// Shared marks a pool on storage every node mounts at the same path
	// (NFS, CephFS, a cluster filesystem): its volumes belong to no node,
	// controllers and node plugins on many machines open it at once, and
	// attachments are the fence between nodes. A shared pool is never
	// initialised by Open (see Init): an unmounted share must not become an
	// empty pool on the local disk.
	Shared bool
	// ID, when set, is the pool ID (from Init) the directory must hold: the
	// check that the right share is mounted.
	ID string
	// ReadOnly opens an existing pool to read it (spool volume list): Open
	// creates no directory, cleans up no leftover and writes nothing.
	ReadOnly bool
	// NodeOnly marks a process that only stages volumes of a shared pool
	// (spool --mode=node): it leaves cleanup to the controllers and does not
	// take their lock.
	NodeOnly bool
}

// ParseSpec parses NAME=DIR[,capacity=SIZE][,shared[,id=POOLID]].
func ParseSpec(s string) (Spec, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return Spec{}, fmt.Errorf("pool %q: want NAME=DIR[,capacity=SIZE][,shared[,id=POOLID]]", s)
	}
	if err := volid.ValidatePoolName(name); err != nil {
		return Spec{}, fmt.Errorf("pool %q: %w", s, err)
	}
	fields := strings.Split(rest, ",")
	spec := Spec{Name: name, Dir: fields[0]}
	if spec.Dir == "" || !filepath.IsAbs(spec.Dir) {
		return Spec{}, fmt.Errorf("pool %q: directory must be an absolute path", s)
	}
	spec.Dir = filepath.Clean(spec.Dir)
	for _, f := range fields[1:] {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "capacity":
			c, err := size.Parse(v)
			if err != nil || c == 0 {
				return Spec{}, fmt.Errorf("pool %q: invalid capacity %q", s, v)
			}
			spec.Capacity = c
		case "shared":
			if v != "" || strings.Contains(f, "=") {
				return Spec{}, fmt.Errorf("pool %q: option shared takes no value", s)
			}
			spec.Shared = true
		case "id":
			if !volid.IsToken(v) {
				return Spec{}, fmt.Errorf("pool %q: invalid pool ID %q: want the %d hex digits spool pool init printed", s, v, volid.TokenLen)
			}
			spec.ID = v
		default:
			return Spec{}, fmt.Errorf("pool %q: unknown option %q (known: capacity, shared, id)", s, k)
		}
	}
	if spec.ID != "" && !spec.Shared {
		return Spec{}, fmt.Errorf("pool %q: id= is for shared pools", s)
	}
	return spec, nil
}

// Specs collects repeated --pool flags; it is a flag.Value.
type Specs []Spec

func (s *Specs) String() string {
	var out []string
	for _, x := range *s {
		out = append(out, x.Name+"="+x.Dir)
	}
	return strings.Join(out, " ")
}

// Set parses one more NAME=DIR[,capacity=SIZE].
func (s *Specs) Set(v string) error {
	spec, err := ParseSpec(v)
	if err != nil {
		return err
	}
	*s = append(*s, spec)
	return nil
}

type identity struct {
	Name      string    `json:"name"`
	ID        string    `json:"id"`
	CreatedAt time.Time `json:"createdAt"`
	Format    int       `json:"format"`
}

// Pool is an open pool directory. Its methods are safe for concurrent use;
// mu guards only the in-memory index and capacity reservations and is never
// held across file I/O on images.
type Pool struct {
	name     string
	root     string
	node     string // owner of a local pool; empty for a shared pool
	capLimit int64
	lock     *os.File
	shared   bool
	id       string // the pool ID in the identity file
	readOnly bool   // Spec.ReadOnly
	// invalid are the objects (volumes/<token>, snapshots/<token>, ...)
	// whose metadata did not hold together at the last read: reported,
	// left alone, not served. Guarded by mu.
	invalid map[string]bool
	// fileLocks queues this process's callers for a shared pool's lock
	// files (flock).
	fileLocks fileQueue

	mu          sync.Mutex
	vols        map[string]*Volume // token -> volume
	names       map[string]string  // name -> token
	pending     map[string]bool    // names being created
	busy        map[string]bool    // tokens being deleted
	reserved    int64              // bytes of volumes being created
	provisioned int64              // sum of CapacityBytes of vols
	snapIndex
}

// Open opens (creating if needed) the pool directory, takes its lock,
// removes what an interrupted create or delete left and loads the index.
func Open(spec Spec, node string) (*Pool, error) {
	if err := volid.ValidatePoolName(spec.Name); err != nil {
		return nil, err
	}
	if err := volid.ValidateNodeID(node); err != nil {
		return nil, err
	}
	if !filepath.IsAbs(spec.Dir) {
		return nil, fmt.Errorf("pool %s: directory %q is not absolute", spec.Name, spec.Dir)
	}
	p := &Pool{
		name: spec.Name, root: filepath.Clean(spec.Dir), node: node, capLimit: spec.Capacity, readOnly: spec.ReadOnly,
		vols: map[string]*Volume{}, names: map[string]string{}, pending: map[string]bool{}, busy: map[string]bool{},
		snapIndex: newSnapIndex(),
	}
	if spec.Shared {
		p.node, p.shared = "", true
		if err := p.openShared(spec); err != nil {
			p.Close()
			return nil, err
		}
		return p, nil
	}
	if spec.Existing {
		if err := p.checkExists(); err != nil {
			return nil, err
		}
	}
	if !spec.ReadOnly {
		if err := os.MkdirAll(p.root, 0o750); err != nil {
			return nil, fmt.Errorf("pool %s: creating %s: %w", p.name, p.root, err)
		}
	}
	lf, err := p.openLock()
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = lf.Close()
		return nil, fmt.Errorf("pool %s: %s is in use by another spool process: %w", p.name, p.root, err)
	}
	p.lock = lf
	if err := p.open(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func (p *Pool) open() error {
	if err := p.checkIdentity(); err != nil {
		return err
	}
	return p.load(true)
}

// load makes the pool's directories, empties its scratch directories when
// clean is set, and loads the index.
func (p *Pool) load(clean bool) error {
	own := []string{volumesDir, snapshotsDir, groupsDir, tmpDir, trashDir}
	if err := p.checkOwnDirs(own...); err != nil {
		return fmt.Errorf("%w: remove or fix it before serving the pool", err)
	}
	for _, d := range own {
		if p.readOnly {
			break
		}
		if err := os.Mkdir(filepath.Join(p.root, d), 0o750); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("pool %s: creating %s: %w", p.name, d, err)
		}
	}
	clean = clean && !p.readOnly
	if clean {
		for _, d := range []string{tmpDir, trashDir} {
			if err := p.emptyDir(d); err != nil {
				return err
			}
		}
	}
	if err := p.loadIndex(clean); err != nil {
		return err
	}
	return p.loadSnapshots(clean)
}

// checkIdentity writes the identity file of a new pool, or checks that an
// existing directory belongs to this pool: renaming a pool would orphan every
// volume ID that names it.
func (p *Pool) checkIdentity() error {
	path := filepath.Join(p.root, identityFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		tok, err := volid.NewToken()
		if err != nil {
			return err
		}
		id := identity{Name: p.name, ID: tok, CreatedAt: time.Now().UTC(), Format: 1}
		data, _ := json.MarshalIndent(id, "", "  ")
		klog.InfoS("Initialising new pool", "pool", p.name, "dir", p.root, "poolID", tok)
		p.id = tok
		return writeFileAtomic(path, data)
	}
	if err != nil {
		return fmt.Errorf("pool %s: reading identity: %w", p.name, err)
	}
	id, err := p.parseIdentity(data)
	if err != nil {
		return err
	}
	p.id = id.ID
	return nil
}

// parseIdentity decodes the identity file and checks that it names this pool.
func (p *Pool) parseIdentity(data []byte) (identity, error) {
	var id identity
	if err := json.Unmarshal(data, &id); err != nil {
		return id, fmt.Errorf("pool %s: %s is corrupt: %w", p.name, filepath.Join(p.root, identityFile), err)
	}
	if id.Name != p.name {
		return id, fmt.Errorf("pool %s: directory %s belongs to pool %q; volume IDs name their pool, so a pool cannot be renamed", p.name, p.root, id.Name)
	}
	return id, nil
}

// checkExists refuses a directory that holds no pool identity file.
func (p *Pool) checkExists() error {
	fi, err := os.Lstat(filepath.Join(p.root, identityFile))
	if err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("pool %s: %s is not a Spool pool (it has no %s): check the directory, or let the driver initialise the pool by serving it once", p.name, p.root, identityFile)
	}
	return nil
}

// emptyDir removes leftovers of interrupted operations inside one of the
// pool's own scratch directories.
func (p *Pool) emptyDir(dir string) error {
	f, err := p.openBeneath(dir, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return fmt.Errorf("pool %s: opening %s: %w", p.name, dir, err)
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("pool %s: reading %s: %w", p.name, dir, err)
	}
	for _, n := range names {
		klog.InfoS("Removing leftover of an interrupted operation", "pool", p.name, "path", filepath.Join(dir, n))
		if err := removeAt(int(f.Fd()), n, removeDepth); err != nil {
			return fmt.Errorf("pool %s: removing %s: %w", p.name, filepath.Join(dir, n), err)
		}
	}
	return nil
}

func (p *Pool) loadIndex(repair bool) error {
	entries, err := os.ReadDir(filepath.Join(p.root, volumesDir))
	if err != nil {
		return fmt.Errorf("pool %s: reading volumes: %w", p.name, err)
	}
	for _, e := range entries {
		if !volid.IsToken(e.Name()) {
			klog.InfoS("Ignoring unknown entry in pool", "pool", p.name, "entry", e.Name())
			continue
		}
		v, err := p.readMeta(e.Name())
		if err != nil {
			// Never delete data we cannot explain: report it and go on.
			klog.ErrorS(err, "Skipping volume with unreadable metadata", "pool", p.name, "token", e.Name())
			p.markInvalid(filepath.Join(volumesDir, e.Name()), true)
			continue
		}
		if repair {
			p.repairSize(v)
		}
		if other, dup := p.names[v.Name]; dup {
			klog.ErrorS(nil, "Two volumes carry the same name; keeping the first", "pool", p.name, "name", v.Name, "kept", other, "skipped", e.Name())
			continue
		}
		p.vols[v.token] = v
		p.names[v.Name] = v.token
		p.provisioned += v.CapacityBytes
	}
	klog.InfoS("Opened pool", "pool", p.name, "dir", p.root, "volumes", len(p.vols))
	return nil
}

// repairSize records the size of an image that is larger than its metadata
// says: ExpandVolume grows the image first and records the size after, so a
// crash in between leaves a larger image, which every later expansion to a
// smaller size would refuse. The growth was reserved when it was made; the
// CO's retry of the expansion then finds the volume large enough.
func (p *Pool) repairSize(v *Volume) {
	// A cheap look first (every volume, at every start); only an image that
	// looks larger is opened beneath the root and checked.
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(p.volumeDir(v.token), imageFile), &st); err != nil || st.Size <= v.CapacityBytes {
		return
	}
	f, err := p.OpenImage(v.token, unix.O_PATH)
	if err != nil {
		return // reported where the image is used
	}
	fi, err := f.Stat()
	_ = f.Close()
	if err != nil || fi.Size() <= v.CapacityBytes || fi.Size() > MaxImageBytes || fi.Size()%size.MiB != 0 {
		return
	}
	was := v.CapacityBytes
	v.CapacityBytes = fi.Size()
	data, err := json.MarshalIndent(v, "", "  ")
	if err == nil {
		err = p.writeAtomic(filepath.Join(volumesDir, v.token, metaFile), data)
	}
	if err != nil {
		v.CapacityBytes = was
		klog.ErrorS(err, "Could not record the size of an image grown before a crash", "pool", p.name, "volumeID", v.ID)
		return
	}
	klog.InfoS("Recorded the size of an image grown before a crash (an interrupted expansion)", "pool", p.name, "volumeID", v.ID, "recorded", was, "image", fi.Size())
}

func (p *Pool) readMeta(token string) (*Volume, error) {
	data, err := p.readBeneath(filepath.Join(volumesDir, token, metaFile))
	if err != nil {
		return nil, err
	}
	v := &Volume{}
	if err := json.Unmarshal(data, v); err != nil {
		return nil, fmt.Errorf("parsing %s of %s: %w: %w", metaFile, token, ErrUntrusted, err)
	}
	id, err := volid.ParseKind(v.ID, volid.KindVolume)
	if err != nil || id.Token != token || id.Pool != p.name {
		return nil, fmt.Errorf("volume %s: %w: metadata names ID %q", token, ErrUntrusted, v.ID)
	}
	if err := v.validate(); err != nil {
		return nil, fmt.Errorf("volume %s: %w: %w", token, ErrUntrusted, err)
	}
	v.token = token
	return v, nil
}

// openLock opens the pool's lock file, which must be a regular file of the
// pool (a link there made Open create a file wherever it pointed).
func (p *Pool) openLock() (*os.File, error) {
	flags := unix.O_RDWR | unix.O_CREAT
	if p.readOnly {
		flags = unix.O_RDONLY
	}
	f, err := p.openBeneath(lockFile, flags)
	if err != nil {
		return nil, fmt.Errorf("pool %s: opening lock file: %w", p.name, err)
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		_ = f.Close()
		return nil, fmt.Errorf("pool %s: %s: %w (not a regular file)", p.name, lockFile, ErrUntrusted)
	}
	return f, nil
}

// Close releases the pool lock.
func (p *Pool) Close() {
	if p.lock != nil {
		_ = p.lock.Close()
		p.lock = nil
	}
}

// Name is the pool name.
func (p *Pool) Name() string { return p.name }

// Root is the pool directory.
func (p *Pool) Root() string { return p.root }

// Node is the node that owns a local pool; it is empty for a shared pool.
func (p *Pool) Node() string { return p.node }

// Shared reports whether the pool is shared between nodes.
func (p *Pool) Shared() bool { return p.shared }

// ID is the pool ID written in its identity file when it was created.
func (p *Pool) ID() string { return p.id }

// volumeDir is the directory of a volume; token must already be validated.
func (p *Pool) volumeDir(token string) string {
	return filepath.Join(p.root, volumesDir, token)
}

// ImagePath returns the image file of the volume with this token.
func (p *Pool) ImagePath(token string) (string, error) {
	if !volid.IsToken(token) {
		return "", fmt.Errorf("invalid token %q", token)
	}
	return filepath.Join(p.volumeDir(token), imageFile), nil
}

// List returns copies of all volumes, sorted by ID. In a shared pool every
// volume is read from disk: the attachments other processes changed are
// what csi-attacher compares its VolumeAttachments with.
func (p *Pool) List() []Volume {
	if p.shared {
		p.refreshShared()
		p.mu.Lock()
		tokens := make([]string, 0, len(p.vols))
		for tok := range p.vols {
			tokens = append(tokens, tok)
		}
		p.mu.Unlock()
		for _, tok := range tokens {
			_, _ = p.reload(tok) // a volume deleted meanwhile drops out
		}
	}
	p.mu.Lock()
	out := make([]Volume, 0, len(p.vols))
	for _, v := range p.vols {
		out = append(out, v.clone())
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// IsImage reports whether path is the image file of a volume of this pool
// (whether or not the volume still exists).
func (p *Pool) IsImage(path string) bool {
	dir, file := filepath.Split(filepath.Clean(path))
	return file == imageFile && volid.IsToken(filepath.Base(dir)) &&
		filepath.Dir(filepath.Clean(dir)) == filepath.Join(p.root, volumesDir)
}
