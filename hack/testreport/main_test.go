package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A run with a pass, a skip with a reason, a skipped subtest and a
// failure: the failure's output and the package lines are printed, the
// passes' output is not, and the summary names both skips.
func TestReport(t *testing.T) {
	const p = "github.com/spool-csi/spool/pkg/x"
	events := []event{
		{Action: "output", Package: p, Test: "TestPass", Output: "=== RUN   TestPass\n"},
		{Action: "output", Package: p, Test: "TestPass", Output: "    x_test.go:3: quiet\n"},
		{Action: "pass", Package: p, Test: "TestPass"},
		{Action: "output", Package: p, Test: "TestSkip", Output: "    x_test.go:5: mkfs.btrfs is not installed\n"},
		{Action: "output", Package: p, Test: "TestSkip", Output: "--- SKIP: TestSkip (0.00s)\n"},
		{Action: "skip", Package: p, Test: "TestSkip"},
		{Action: "output", Package: p, Test: "TestSub/y", Output: "    x_test.go:9: needs root\n"},
		{Action: "skip", Package: p, Test: "TestSub/y"},
		{Action: "output", Package: p, Test: "TestFail", Output: "    x_test.go:12: boom\n"},
		{Action: "output", Package: p, Test: "TestFail", Output: "--- FAIL: TestFail (0.00s)\n"},
		{Action: "fail", Package: p, Test: "TestFail"},
		{Action: "output", Package: p, Output: "FAIL\n"},
		{Action: "output", Package: p, Output: "FAIL\t" + p + "\t0.01s\n"},
		{Action: "fail", Package: p},
		{Action: "output", Package: p + "/ok", Output: "PASS\n"},
		{Action: "output", Package: p + "/ok", Output: "ok  \t" + p + "/ok\t0.01s\n"},
		{Action: "pass", Package: p + "/ok"},
		{Action: "build-output", ImportPath: p + "/broken", Output: "x.go:1: undefined: y\n"},
		{Action: "build-fail", ImportPath: p + "/broken"},
	}
	var out bytes.Buffer
	r := newReport(&out)
	for _, e := range events {
		r.add(e)
	}
	got := out.String()
	for _, want := range []string{"boom", "--- FAIL: TestFail", "FAIL\t" + p, "ok  \t" + p + "/ok", "undefined: y"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "quiet") || strings.Contains(got, "=== RUN") {
		t.Errorf("output holds a passing test's lines:\n%s", got)
	}
	want := "skipped 2: pkg/x TestSkip (mkfs.btrfs is not installed); pkg/x TestSub/y (needs root)"
	if s := r.summary(); s != want {
		t.Errorf("summary %q, want %q", s, want)
	}
}

// need.sh refuses a target whose programs are missing, naming each with
// its package, and only notes them for make test.
func TestNeed(t *testing.T) {
	empty := t.TempDir()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash is not installed")
	}
	script, _ := filepath.Abs("../need.sh")
	run := func(target string) (string, error) {
		cmd := exec.Command(bash, script, target)
		// Only the shell's builtins and command -v: no program is found.
		cmd.Env = append(os.Environ(), "PATH="+empty)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("e2e")
	if err == nil || !strings.Contains(out, "mkfs.btrfs (btrfs-progs)") || !strings.Contains(out, "apt-get install btrfs-progs e2fsprogs mount openssl util-linux xfsprogs") {
		t.Errorf("make e2e without tools: %v\n%s", err, out)
	}
	if _, err := run("test"); err != nil {
		t.Errorf("make test without tools must go on (its cases skip): %v", err)
	}
}
