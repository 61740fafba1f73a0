package pool

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzReadMeta feeds the metadata loader what anyone who can write a pool
// could plant as a volume.json. It never panics, and whatever it accepts
// holds together: a size that counts against capacity, a known access type
// and filesystem, the volume's own ID.
func FuzzReadMeta(f *testing.F) {
	const token = "0123456789abcdef01234567"
	f.Add([]byte(`{"id":"test:node-1:` + token + `","name":"pvc-1","capacityBytes":16777216,"provisioning":"thin","accessType":"mount","fsType":"ext4"}`))
	f.Add([]byte(`{"id":"test:node-1:` + token + `","name":"pvc-1","capacityBytes":-1125899906842624,"provisioning":"thin"}`))
	f.Add([]byte(`{"id":"test:node-1:` + token + `","name":"b","capacityBytes":1048576,"provisioning":"thick","accessType":"block","fsType":"xfs"}`))
	f.Add([]byte(`{"id":"test:node-1:` + token + `","name":"a","capacityBytes":1048576,"provisioning":"thin","attachments":[{"node":"../x","generation":1}]}`))
	f.Add([]byte(`{"id":"other:node-1:` + token + `"}`))
	f.Add([]byte(`[]`))
	f.Add([]byte("\x00\xff"))
	dir := f.TempDir()
	p := &Pool{name: "test", root: dir, node: "node-1"}
	vdir := filepath.Join(dir, volumesDir, token)
	if err := os.MkdirAll(vdir, 0o750); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(vdir, metaFile), data, 0o600); err != nil {
			t.Fatal(err)
		}
		v, err := p.readMeta(token)
		if err != nil {
			return
		}
		if v.CapacityBytes <= 0 || v.CapacityBytes > MaxImageBytes {
			t.Fatalf("accepted capacityBytes %d", v.CapacityBytes)
		}
		if v.AccessType != "" && v.AccessType != Mount && v.AccessType != Block {
			t.Fatalf("accepted access type %q", v.AccessType)
		}
		if !knownFSTypes[v.FSType] || (v.AccessType == Block && v.FSType != "") {
			t.Fatalf("accepted fsType %q for %q", v.FSType, v.AccessType)
		}
		if v.Token() != token || v.Name == "" {
			t.Fatalf("accepted %+v", v)
		}
	})
}
