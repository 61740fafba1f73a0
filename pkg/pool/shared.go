package pool

// Shared pools live on storage that every node mounts at the same path. Many
// spool processes open one at once: controllers (normally one leader, but two
// may briefly both believe they lead) and a node plugin on every node. The
// rules that keep them consistent:
//
//   - Every metadata update of a volume (attach, detach, expand, a node's
//     note that it gave a copy its own filesystem ID) holds an exclusive
//     flock on volumes/<token>/.lock and re-reads volume.json from disk
//     before it changes it: a compare-and-swap, so two controllers cannot
//     both attach a volume to different nodes.
//   - A new volume is built under .tmp without any pool-wide lock, then
//     committed under .create.lock after checking, on disk, that no other
//     controller committed the same name meanwhile.
//   - The in-memory index is a cache: reads of one volume go to disk, and a
//     name or listing that the index does not explain rescans volumes/.
//   - Every controller holds .lock shared; the scratch directories (.tmp,
//     .trash) are emptied only by a controller that gets it exclusively,
//     that is, when no other controller is alive to be building something
//     there. Node plugins (NodeOnly) take no pool lock and never clean.
//
// flock works on NFSv4 (emulated with byte-range locks) and CephFS.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/volid"
)

const (
	createLockFile = ".create.lock"
	volumeLockFile = ".lock"
	nodesDir       = "nodes"
)

// Init makes dir a new shared pool called name and returns its pool ID.
// It refuses a directory that already holds anything: a pool is initialised
// once, on the share itself, by an operator (spool pool init).
func Init(name, dir string) (string, error) {
	if err := volid.ValidatePoolName(name); err != nil {
		return "", err
	}
	if !filepath.IsAbs(dir) {
		return "", fmt.Errorf("pool %s: directory %q is not absolute", name, dir)
	}
	dir = filepath.Clean(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", fmt.Errorf("pool %s: creating %s: %w", name, dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("pool %s: reading %s: %w", name, dir, err)
	}
	if len(entries) > 0 {
		return "", fmt.Errorf("pool %s: %s is not empty (it holds %s): a pool is initialised in an empty directory", name, dir, entries[0].Name())
	}
	p := &Pool{name: name, root: dir}
	if err := p.checkIdentity(); err != nil {
		return "", err
	}
	for _, d := range []string{volumesDir, snapshotsDir, groupsDir, tmpDir, trashDir} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o750); err != nil {
			return "", fmt.Errorf("pool %s: creating %s: %w", name, d, err)
		}
	}
	return p.id, syncDir(dir)
}

// openShared opens an existing shared pool (see the comment at the top).
func (p *Pool) openShared(spec Spec) error {
	if err := p.checkExists(); err != nil {
		return err
	}
	if err := p.checkIdentity(); err != nil {
		return err
	}
	if spec.ID != "" && spec.ID != p.id {
		return fmt.Errorf("pool %s: %s holds pool ID %s, not the configured %s: is the right share mounted there?", p.name, p.root, p.id, spec.ID)
	}
	if spec.NodeOnly || spec.ReadOnly {
		return p.load(false)
	}
	lf, err := p.openLock()
	if err != nil {
		return err
	}
	p.lock = lf
	alone := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
	if err := p.load(alone); err != nil {
		return err
	}
	// Downgrade (or wait, while another controller cleans up) to the shared
	// lock every controller holds while it runs.
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_SH); err != nil {
		return fmt.Errorf("pool %s: locking %s: %w", p.name, lockFile, err)
	}
	klog.InfoS("Opened shared pool", "pool", p.name, "dir", p.root, "poolID", p.id, "cleanedUp", alone)
	return nil
}

// CheckIdentity re-reads the identity file and checks that it still names
// the pool opened: on a node, the proof that the share is still mounted.
func (p *Pool) CheckIdentity() error {
	data, err := os.ReadFile(filepath.Join(p.root, identityFile))
	if err != nil {
		return fmt.Errorf("pool %s: %s has no readable identity (is the share mounted?): %w", p.name, p.root, err)
	}
	id, err := p.parseIdentity(data)
	if err != nil {
		return err
	}
	if id.ID != p.id {
		return fmt.Errorf("pool %s: %s now holds pool ID %s, not %s: another share is mounted there", p.name, p.root, id.ID, p.id)
	}
	return nil
}

// ErrBusy means a lock of a shared pool stayed held by another process for
// longer than LockWait: the caller answers Aborted and the CO retries,
// instead of waiting without bound on a share another machine may have
// stopped answering for.
var ErrBusy = errors.New("locked by another process")

// LockWait bounds how long a lock of a shared pool (a volume's, or the
// create lock) is waited for.
var LockWait = 5 * time.Second

// flock takes an exclusive flock on rel (relative to the pool root, opened
// beneath it and created if missing); unlock releases it. It polls with
// LOCK_NB for at most LockWait, so no lock on the share is waited for
// without bound and nothing else waits behind this one: each volume has its
// own lock file, and no process-wide mutex is held while polling.
func (p *Pool) flock(rel string) (unlock func(), err error) {
	deadline := time.Now().Add(LockWait)
	// Callers in this process queue for the file first, so only one of them
	// polls the share.
	release, err := p.fileLocks.acquire(rel, deadline)
	if err != nil {
		return nil, fmt.Errorf("pool %s: %s: %w for more than %s", p.name, rel, err, LockWait)
	}
	f, err := p.openBeneath(rel, unix.O_RDWR|unix.O_CREAT)
	if err != nil {
		release()
		return nil, err
	}
	for delay := time.Millisecond; ; delay = min(2*delay, 20*time.Millisecond) {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close(); release() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			_ = f.Close()
			release()
			return nil, fmt.Errorf("flock %s: %w", rel, err)
		}
		if time.Now().After(deadline) {
			_ = f.Close()
			release()
			return nil, fmt.Errorf("pool %s: %s: %w for more than %s", p.name, rel, ErrBusy, LockWait)
		}
		time.Sleep(delay)
	}
}

// fileQueue lets the callers of one process wait their turn for a lock
// file, each for a bounded time; an entry lives while anyone holds or
// waits for its file.
type fileQueue struct {
	mu    sync.Mutex
	slots map[string]*fileSlot
}

type fileSlot struct {
	turn  chan struct{} // holds a token while the file is free in this process
	users int
}

// acquire waits until deadline for rel's turn; release gives it back.
func (q *fileQueue) acquire(rel string, deadline time.Time) (release func(), err error) {
	q.mu.Lock()
	if q.slots == nil {
		q.slots = map[string]*fileSlot{}
	}
	s, ok := q.slots[rel]
	if !ok {
		s = &fileSlot{turn: make(chan struct{}, 1)}
		s.turn <- struct{}{}
		q.slots[rel] = s
	}
	s.users++
	q.mu.Unlock()
	done := func() {
		q.mu.Lock()
		if s.users--; s.users == 0 {
			delete(q.slots, rel)
		}
		q.mu.Unlock()
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-s.turn:
		return func() { s.turn <- struct{}{}; done() }, nil
	case <-t.C:
		done()
		return nil, ErrBusy
	}
}

// lockVolume takes a shared pool's lock of one volume's metadata. A volume
// whose directory is gone is NotFound.
func (p *Pool) lockVolume(token string) (func(), error) {
	t0 := time.Now()
	unlock, err := p.flock(filepath.Join(volumesDir, token, volumeLockFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errorf(ErrNotFound, "volume %s::%s does not exist", p.name, token)
	}
	if err != nil {
		return nil, fmt.Errorf("pool %s: locking volume %s: %w", p.name, token, err)
	}
	if d := time.Since(t0); d > time.Second {
		klog.InfoS("Waited for another process's lock on a volume", "pool", p.name, "token", token, "waited", d)
	}
	return unlock, nil
}

// reload reads one volume of a shared pool from disk into the index.
func (p *Pool) reload(token string) (Volume, error) {
	v, err := p.readMeta(token)
	p.mu.Lock()
	defer p.mu.Unlock()
	old, had := p.vols[token]
	if errors.Is(err, os.ErrNotExist) {
		if had {
			p.forget(old)
		}
		return Volume{}, errorf(ErrNotFound, "volume %s::%s does not exist", p.name, token)
	}
	if err != nil {
		return Volume{}, fmt.Errorf("pool %s: reading volume %s: %w", p.name, token, err)
	}
	if had {
		p.provisioned += v.CapacityBytes - old.CapacityBytes
		if p.names[old.Name] == token {
			delete(p.names, old.Name)
		}
	} else {
		p.provisioned += v.CapacityBytes
	}
	p.vols[token] = v
	p.names[v.Name] = token
	return v.clone(), nil
}

// forget drops a volume from the index; p.mu is held.
func (p *Pool) forget(v *Volume) {
	delete(p.vols, v.token)
	p.provisioned -= v.CapacityBytes
	if p.names[v.Name] == v.token {
		delete(p.names, v.Name)
	}
}

// refreshShared brings the index of a shared pool up to date with what
// other controllers created and deleted. Local pools are only ever changed
// through this process, so their index is always current.
func (p *Pool) refreshShared() {
	if !p.shared {
		return
	}
	if err := p.refreshVolumes(); err != nil {
		klog.ErrorS(err, "Could not rescan shared pool", "pool", p.name)
	}
}

// refreshVolumes rescans volumes/: reads the volumes the index lacks and
// drops those whose directory is gone.
func (p *Pool) refreshVolumes() error {
	entries, err := os.ReadDir(filepath.Join(p.root, volumesDir))
	if err != nil {
		return fmt.Errorf("pool %s: reading volumes: %w", p.name, err)
	}
	onDisk := map[string]bool{}
	var fresh []*Volume
	p.mu.Lock()
	for _, e := range entries {
		tok := e.Name()
		if !volid.IsToken(tok) {
			continue
		}
		onDisk[tok] = true
		if _, ok := p.vols[tok]; ok {
			continue
		}
		p.mu.Unlock()
		v, err := p.readMeta(tok)
		rel := filepath.Join(volumesDir, tok)
		if err != nil && !errors.Is(err, os.ErrNotExist) && !p.isInvalid(rel) {
			klog.ErrorS(err, "Skipping volume with unreadable metadata", "pool", p.name, "token", tok)
		}
		p.markInvalid(rel, err != nil && !errors.Is(err, os.ErrNotExist))
		p.mu.Lock()
		if err == nil {
			fresh = append(fresh, v)
		}
	}
	for tok, v := range p.vols {
		if !onDisk[tok] && !p.busy[tok] {
			p.forget(v)
		}
	}
	for _, v := range fresh {
		if _, ok := p.vols[v.token]; ok {
			continue
		}
		if _, dup := p.names[v.Name]; dup {
			continue
		}
		p.vols[v.token] = v
		p.names[v.Name] = v.token
		p.provisioned += v.CapacityBytes
	}
	p.mu.Unlock()
	return nil
}

// errNameTaken reports that another controller committed a volume of the
// same name while this one was building it.
type errNameTaken struct{ token string }

func (e errNameTaken) Error() string { return "name committed by another controller as " + e.token }

// commitShared runs commit (the rename of a built volume into volumes/)
// under the pool's create lock, unless the name appeared on disk meanwhile.
func (p *Pool) commitShared(name, token string, commit func() error) error {
	return p.underCreateLock(func() error {
		if err := p.refreshVolumes(); err != nil {
			return err
		}
		p.mu.Lock()
		other, taken := p.names[name]
		p.mu.Unlock()
		if taken && other != token {
			return errNameTaken{token: other}
		}
		return commit()
	})
}

// underCreateLock runs fn holding the shared pool's create lock, which
// every controller takes to check that a name is free and commit an object
// under it.
func (p *Pool) underCreateLock(fn func() error) error {
	unlock, err := p.flock(createLockFile)
	if err != nil {
		return err
	}
	defer unlock()
	return fn()
}

// nodeRecord is a node plugin's registration in a shared pool.
type nodeRecord struct {
	Node         string    `json:"node"`
	RegisteredAt time.Time `json:"registeredAt"`
}

// RegisterNode records, in a shared pool, that node has the pool mounted:
// controllers attach volumes only to registered nodes. The record is
// written once and stays when the node goes away; a node that never had
// the pool is never in it.
func (p *Pool) RegisterNode(node string) error {
	if err := volid.ValidateNodeID(node); err != nil {
		return err
	}
	if p.NodeRegistered(node) {
		// Once is enough: a restart writes nothing to the share.
		return nil
	}
	dir := filepath.Join(p.root, nodesDir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("pool %s: creating %s: %w", p.name, nodesDir, err)
	}
	data, _ := json.MarshalIndent(nodeRecord{Node: node, RegisteredAt: time.Now().UTC()}, "", "  ")
	if err := p.writeAtomic(filepath.Join(nodesDir, node+".json"), data); err != nil {
		return fmt.Errorf("pool %s: registering node %s: %w", p.name, node, err)
	}
	klog.InfoS("Registered this node in shared pool", "pool", p.name, "node", node)
	return nil
}

// NodeRegistered reports whether node has registered in the shared pool.
func (p *Pool) NodeRegistered(node string) bool {
	if volid.ValidateNodeID(node) != nil {
		return false
	}
	fi, err := os.Stat(filepath.Join(p.root, nodesDir, node+".json"))
	return err == nil && fi.Mode().IsRegular()
}
