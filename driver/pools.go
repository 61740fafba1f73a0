package driver

import (
	"slices"
	"strings"

	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/volid"
)

// pools is the set of pools a process serves, in configuration order (the
// first is the default). Every question about more than one pool is asked
// here, once: which pool an ID names, which pool holds a name, a page of
// all volumes, how many volumes a node has attached.
type pools struct {
	order  []*pool.Pool
	byName map[string]*pool.Pool
}

func (s *pools) add(p *pool.Pool) {
	if s.byName == nil {
		s.byName = map[string]*pool.Pool{}
	}
	s.order = append(s.order, p)
	s.byName[p.Name()] = p
}

// all returns the pools in configuration order.
func (s *pools) all() []*pool.Pool { return s.order }

// names returns the pool names in configuration order.
func (s *pools) names() []string {
	out := make([]string, 0, len(s.order))
	for _, p := range s.order {
		out = append(out, p.Name())
	}
	return out
}

// get returns the named pool, or the first pool for "".
func (s *pools) get(name string) (*pool.Pool, bool) {
	if name == "" {
		if len(s.order) == 0 {
			return nil, false // an attach controller has no pools
		}
		return s.order[0], true
	}
	p, ok := s.byName[name]
	return p, ok
}

// anyShared reports whether any pool is shared.
func (s *pools) anyShared() bool { return slices.ContainsFunc(s.order, (*pool.Pool).Shared) }

// close releases every pool.
func (s *pools) close() {
	for _, p := range s.order {
		p.Close()
	}
}

// resolve parses an ID of a kind and finds its pool. Malformed IDs and IDs
// of pools or nodes not served here are NotFound: no such object exists
// here.
func (s *pools) resolve(id string, kind volid.Kind) (*pool.Pool, volid.ID, error) {
	what := "volume"
	if kind != volid.KindVolume {
		what = string(kind)
	}
	vid, err := volid.ParseKind(id, kind)
	if err != nil {
		return nil, volid.ID{}, notFoundf("%s %q does not exist: %v", what, id, err)
	}
	p, ok := s.byName[vid.Pool]
	if !ok {
		return nil, vid, notFoundf("%s %s does not exist: pool %s is not served here", what, id, vid.Pool)
	}
	if p.Node() != vid.Node {
		return nil, vid, notFoundf("%s %s does not exist here: it lives on node %s", what, id, vid.Node)
	}
	return p, vid, nil
}

// volume finds a volume by ID; a volume that does not exist here is
// NotFound.
func (s *pools) volume(id string) (*pool.Pool, pool.Volume, error) {
	p, vid, err := s.resolve(id, volid.KindVolume)
	if err != nil {
		return nil, pool.Volume{}, err
	}
	v, err := p.Get(vid.Token)
	return p, v, err
}

// volumeNamed finds the volume of a name in any pool.
func (s *pools) volumeNamed(name string) (*pool.Pool, pool.Volume, bool) {
	for _, p := range s.order {
		if v, ok := p.GetByName(name); ok {
			return p, v, true
		}
	}
	return nil, pool.Volume{}, false
}

// snapshotNamed finds the snapshot of a name in any pool: names are unique
// across the driver.
func (s *pools) snapshotNamed(name string) (pool.Snapshot, bool) {
	for _, p := range s.order {
		if snap, ok := p.GetSnapshotByName(name); ok {
			return snap, true
		}
	}
	return pool.Snapshot{}, false
}

// poolVolume is a volume with its pool.
type poolVolume struct {
	p *pool.Pool
	v pool.Volume
}

// volumePage returns up to max volumes (defaultPageSize for 0) of all pools
// in ID order, from the ID start on, and the ID to resume from.
func (s *pools) volumePage(start string, max int32) ([]poolVolume, string, error) {
	if max < 0 {
		return nil, "", invalidf("max_entries must not be negative")
	}
	if start != "" {
		if _, err := volid.ParseKind(start, volid.KindVolume); err != nil {
			return nil, "", abortedf("starting token %q is not valid: %v", start, err)
		}
	}
	var all []poolVolume
	for _, p := range s.order {
		for _, v := range p.List() {
			if v.ID >= start {
				all = append(all, poolVolume{p, v})
			}
		}
	}
	slices.SortFunc(all, func(a, b poolVolume) int { return strings.Compare(a.v.ID, b.v.ID) })
	if n := pageSize(max); len(all) > n {
		return all[:n], all[n].v.ID, nil
	}
	return all, "", nil
}

// snapshots returns the snapshots of all pools that keep passes, in ID
// order.
func (s *pools) snapshots(keep func(pool.Snapshot) bool) []pool.Snapshot {
	var all []pool.Snapshot
	for _, p := range s.order {
		for _, snap := range p.ListSnapshots() {
			if keep(snap) {
				all = append(all, snap)
			}
		}
	}
	slices.SortFunc(all, func(a, b pool.Snapshot) int { return strings.Compare(a.ID, b.ID) })
	return all
}

// attachedTo counts the volumes attached to node in all pools.
func (s *pools) attachedTo(node string) int64 {
	var n int64
	for _, p := range s.order {
		for _, v := range p.List() {
			if _, ok := v.AttachmentFor(node); ok {
				n++
			}
		}
	}
	return n
}

// defaultPageSize is the page ListVolumes and ListSnapshots return when the
// CO asks for no particular size: every entry of a pool of many thousand
// volumes would outgrow a gRPC message (4 MiB), and building it holds
// every volume in memory at once. The CO follows next_token as for any
// page.
const defaultPageSize = 1000

// pageSize is the number of entries a list call returns at most.
func pageSize(maxEntries int32) int {
	if maxEntries > 0 {
		return int(maxEntries)
	}
	return defaultPageSize
}
