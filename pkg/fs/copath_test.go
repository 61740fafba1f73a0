package fs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// plant makes the hostile states a CO path can be found in.
func plant(t *testing.T) (dir string, paths map[string]string) {
	t.Helper()
	dir = t.TempDir()
	paths = map[string]string{
		"missing":   filepath.Join(dir, "missing"),
		"emptyDir":  filepath.Join(dir, "empty-dir"),
		"emptyFile": filepath.Join(dir, "empty-file"),
		"file":      filepath.Join(dir, "file"),
		"fullDir":   filepath.Join(dir, "full-dir"),
		"link":      filepath.Join(dir, "link"),
		"dirLink":   filepath.Join(dir, "dir-link"),
		"fifo":      filepath.Join(dir, "fifo"),
		"markerDir": filepath.Join(dir, "marker-dir"),
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(paths["emptyDir"], 0o750))
	must(os.WriteFile(paths["emptyFile"], nil, 0o600))
	must(os.WriteFile(paths["file"], []byte("data"), 0o600))
	must(os.MkdirAll(filepath.Join(paths["fullDir"], "x"), 0o750))
	must(os.Symlink(paths["file"], paths["link"]))
	must(os.Symlink(paths["emptyDir"], paths["dirLink"]))
	must(syscall.Mkfifo(paths["fifo"], 0o600))
	must(os.Mkdir(paths["markerDir"], 0o750))
	must(os.WriteFile(filepath.Join(paths["markerDir"], "device"), nil, 0o600))
	return dir, paths
}

func TestCOPathHelpers(t *testing.T) {
	type want struct{ makeDir, makeFile, remove bool } // true: succeeds
	cases := map[string]want{
		"missing":   {true, true, true},
		"emptyDir":  {true, false, true},
		"emptyFile": {false, true, true},
		"file":      {false, false, false},
		"fullDir":   {false, false, false},
		"link":      {false, false, false},
		"dirLink":   {false, false, false},
		"fifo":      {false, false, false},
		"markerDir": {false, false, false},
	}
	for name, w := range cases {
		for op, fn := range map[string]func(string) error{"MakeDir": func(p string) error { return MakeDir(p) }, "MakeFile": MakeFile, "RemoveEmpty": RemoveEmpty} {
			_, paths := plant(t)
			p := paths[name]
			ok := map[string]bool{"MakeDir": w.makeDir, "MakeFile": w.makeFile, "RemoveEmpty": w.remove}[op]
			err := fn(p)
			if (err == nil) != ok {
				t.Errorf("%s(%s): %v, want success %t", op, name, err, ok)
			}
			if err != nil && name != "missing" && !errors.Is(err, ErrNotEmpty) {
				t.Errorf("%s(%s): %v, want ErrNotEmpty", op, name, err)
			}
			// What is refused stays as it was.
			if err != nil {
				if b, rerr := os.ReadFile(paths["file"]); rerr != nil || string(b) != "data" {
					t.Errorf("%s(%s) changed the planted file", op, name)
				}
				if _, serr := os.Lstat(p); serr != nil {
					t.Errorf("%s(%s) removed the path: %v", op, name, serr)
				}
			}
		}
	}
	// The block marker of an interrupted stage may stay in a staging
	// directory; nothing else may.
	_, paths := plant(t)
	if err := MakeDir(paths["markerDir"], "device"); err != nil {
		t.Errorf("MakeDir with the marker allowed: %v", err)
	}
	if err := MakeDir(paths["fullDir"], "device"); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("MakeDir(fullDir, device): %v, want ErrNotEmpty", err)
	}
}
