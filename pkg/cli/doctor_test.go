package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/spool-csi/spool/pkg/doctor"
)

// A node described by files: kubelet directory shared, every tool there
// unless missing names it.
func fakeDoctorSystem(t *testing.T, missing string) doctor.System {
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return doctor.System{
		ProcFilesystems: write("filesystems", "\text4\n\txfs\n\tbtrfs\n"),
		MountInfo:       write("mountinfo", "27 1 254:0 / / rw shared:1 - ext4 /dev/vda rw\n"),
		Status:          write("status", "CapEff:\t000001ffffffffff\n"),
		Locks:           write("locks", ""),
		LoopControl:     func() (string, error) { return "/dev/loop0", nil },
		LookPath: func(name string) (string, error) {
			if name == missing {
				return "", errors.New("not found")
			}
			return "/sbin/" + name, nil
		},
		Version: func(context.Context, string, ...string) string { return "1.0" },
		Loops:   func() ([]string, error) { return nil, nil },
	}
}

func TestDoctorCommand(t *testing.T) {
	dir := newPool(t)
	var out, errb bytes.Buffer
	if code := doctorWith([]string{"--pool", "default=" + dir, "-o", "json"}, &out, &errb, fakeDoctorSystem(t, "")); code != exitOK {
		t.Fatalf("exit %d on a good node: %s%s", code, out.String(), errb.String())
	}
	var rs []doctor.Result
	if err := json.Unmarshal(out.Bytes(), &rs); err != nil || len(rs) < 8 {
		t.Fatalf("-o json printed %q: %v", out.String(), err)
	}
	out.Reset()
	if code := doctorWith([]string{"--pool", "default=" + dir}, &out, &errb, fakeDoctorSystem(t, "mkfs.ext4")); code != exitError {
		t.Fatalf("exit %d without mkfs.ext4, want %d:\n%s", code, exitError, out.String())
	}
	if !bytes.Contains(out.Bytes(), []byte("FAIL  filesystem ext4")) {
		t.Errorf("text output:\n%s", out.String())
	}
	for _, args := range [][]string{{"-o", "yaml"}, {"extra"}, {"--pool", "bad"}} {
		if code := doctorWith(args, &out, &errb, fakeDoctorSystem(t, "")); code != exitUsage {
			t.Errorf("spool doctor %q: exit %d, want %d", args, code, exitUsage)
		}
	}
}
