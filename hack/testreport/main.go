// Command testreport reads `go test -json` on stdin and writes what a plain
// `go test ./...` would (one line per package, the output of failed tests
// and packages, build errors), then one line that lists every skipped test
// with its reason: a test skipped for a missing tool or privilege is then
// seen without -v. make test runs it (hack/test.sh).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// event is one record of test2json (go doc test2json).
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output and build-fail events
}

type key struct{ pkg, test string }

// report accumulates output until it knows whether it is needed.
type report struct {
	w       io.Writer
	tests   map[key][]string
	pkgs    map[string][]string
	builds  map[string][]string
	skipped map[string][]string // reason -> tests
	count   int
}

func newReport(w io.Writer) *report {
	return &report{w: w, tests: map[key][]string{}, pkgs: map[string][]string{}, builds: map[string][]string{}, skipped: map[string][]string{}}
}

func (r *report) print(lines []string) {
	for _, l := range lines {
		if strings.HasPrefix(l, "=== ") {
			continue
		}
		fmt.Fprint(r.w, l)
	}
}

func (r *report) add(e event) {
	switch {
	case e.ImportPath != "":
		if e.Action == "build-output" {
			r.builds[e.ImportPath] = append(r.builds[e.ImportPath], e.Output)
		} else if e.Action == "build-fail" {
			r.print(r.builds[e.ImportPath])
		}
	case e.Test != "":
		k := key{e.Package, e.Test}
		switch e.Action {
		case "output":
			r.tests[k] = append(r.tests[k], e.Output)
		case "fail":
			r.print(r.tests[k])
			delete(r.tests, k)
		case "skip":
			reason := skipReason(r.tests[k])
			r.skipped[reason] = append(r.skipped[reason], shortPkg(e.Package)+" "+e.Test)
			r.count++
			delete(r.tests, k)
		case "pass":
			delete(r.tests, k)
		}
	default:
		switch e.Action {
		case "output":
			r.pkgs[e.Package] = append(r.pkgs[e.Package], e.Output)
		case "pass", "skip":
			for _, l := range r.pkgs[e.Package] {
				if strings.HasPrefix(l, "ok ") || strings.HasPrefix(l, "?") || strings.HasPrefix(l, "ok\t") {
					fmt.Fprint(r.w, l)
				}
			}
			delete(r.pkgs, e.Package)
		case "fail":
			r.print(r.pkgs[e.Package])
			delete(r.pkgs, e.Package)
		}
	}
}

// skipReason is the message of t.Skip: the last line before "--- SKIP"
// that a test printed ("    file_test.go:12: mkfs.btrfs is not installed").
func skipReason(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "--- SKIP") || strings.HasPrefix(l, "=== ") {
			continue
		}
		if _, msg, ok := strings.Cut(l, ".go:"); ok {
			if _, rest, ok := strings.Cut(msg, ": "); ok {
				return rest
			}
		}
		return l
	}
	return "no reason given"
}

func shortPkg(p string) string {
	return strings.TrimPrefix(p, "github.com/spool-csi/spool/")
}

// summary is the last line: every skipped test, grouped by reason.
func (r *report) summary() string {
	if r.count == 0 {
		return "skipped: none"
	}
	reasons := make([]string, 0, len(r.skipped))
	for reason := range r.skipped {
		reasons = append(reasons, reason)
	}
	slices.Sort(reasons)
	parts := make([]string, 0, len(reasons))
	for _, reason := range reasons {
		tests := r.skipped[reason]
		slices.Sort(tests)
		parts = append(parts, fmt.Sprintf("%s (%s)", strings.Join(tests, ", "), reason))
	}
	return fmt.Sprintf("skipped %d: %s", r.count, strings.Join(parts, "; "))
}

func main() {
	r := newReport(os.Stdout)
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Println(string(line)) // not test2json: go's own messages
			continue
		}
		r.add(e)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
	fmt.Println(r.summary())
}
