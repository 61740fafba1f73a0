//go:build e2e

package e2e

import (
	"bufio"
	"cmp"
	"context"
	"encoding/xml"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

var (
	externalDriver = flag.String("e2e.external", "", "run the Kubernetes external storage e2e suite with this test-driver.yaml")
	externalReport = flag.String("e2e.external-report", "", "directory for the suite's JUnit report and log")
	knownFailures  = flag.String("e2e.known-failures", "external/known-environment-failures.txt", "failures this sandbox causes, one spec name pattern a line")
	externalProcs  = flag.Int("e2e.external-procs", 8, "parallel ginkgo processes for the external storage suite")
	externalFocus  = flag.String("e2e.external-focus", "", "run only the External.Storage specs whose names match this regular expression")
	withFeatures   = flag.Bool("e2e.external-features", true, "also run the [Feature:] specs of the features this cluster has (enabledFeatures); false: leave every [Feature:] spec out, the reference driver's selection")
)

// TestExternalStorageSuite runs k8s.io/kubernetes/test/e2e/storage/external
// (e2e-storage.test, built by hack/e2e-tools.sh --external from
// test/e2e/tools/e2estorage) against the running
// driver, counts passed, failed and skipped specs, and fails on any failure
// that is not a known limit of this sandbox.
func TestExternalStorageSuite(t *testing.T) {
	if *externalDriver == "" {
		t.Skip("-e2e.external not given (make e2e-external)")
	}
	// Every spec has a namespace of its own, and so do the deploy
	// scenarios that run beside it in make e2e-flavours.
	independent(t)
	// The suite runs for tens of minutes: longer than ctxFor allows.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Minute)
	defer cancel()
	driverFile, err := filepath.Abs(*externalDriver)
	if err != nil {
		t.Fatal(err)
	}
	known, err := readKnownFailures(*knownFailures)
	if err != nil {
		t.Fatal(err)
	}
	// Limits that only one flavour meets: known-environment-failures-<flavour>.txt.
	if *flavour != "" {
		perFlavour := strings.TrimSuffix(*knownFailures, ".txt") + "-" + *flavour + ".txt"
		if _, err := os.Stat(perFlavour); err == nil {
			more, err := readKnownFailures(perFlavour)
			if err != nil {
				t.Fatal(err)
			}
			known = append(known, more...)
		}
	}
	if err := importSuiteImages(ctx); err != nil {
		t.Fatal(err)
	}
	report := *externalReport
	if report == "" {
		report = t.TempDir()
	}
	if err := os.MkdirAll(report, 0o755); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(filepath.Join(report, "e2e.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	c := env.c
	// The [Feature:] specs run for the features this cluster has (by label:
	// the label filter and a name regexp select the same specs).
	// -e2e.external-features=false leaves every one out instead: the
	// selection the reference driver was measured on.
	skip, labels := `Disruptive|Serial|Slow`, enabledFeatures
	if !*withFeatures {
		skip, labels = `Disruptive|Serial|Slow|\[Feature:`, ""
	}
	for _, e := range known {
		switch {
		case e.skip:
			t.Logf("skipped in this flavour: %s (%s)", e.pattern, e.reason)
		case e.requires != "" && !hostHas(e.requires):
			t.Logf("skipped, this host lacks %s: %s (%s)", e.requires, e.pattern, e.reason)
		default:
			continue
		}
		skip += "|" + e.regexp()
	}
	// The ginkgo CLI runs e2e.test in parallel processes: the specs mostly
	// wait on pods and volumes, so a 2-core machine runs several at once.
	args := []string{
		"--procs=" + strconv.Itoa(*externalProcs),
		"--focus=External.Storage" + focusAnd(*externalFocus),
		"--skip=" + skip,
		"--label-filter=" + labels, // empty: no filter
		"--timeout=90m",
		"--no-color",
		c.Bin("e2e-storage.test"), "--",
		"-kubeconfig=" + c.Kubeconfig,
		"-provider=skeleton",
		"-kubectl-path=" + c.Bin("kubectl"),
		"-kubelet-root-dir=" + c.KubeletRoot(),
		"-container-runtime-endpoint=unix://" + c.ContainerdSocket(),
		"-report-dir=" + report,
		"-disable-log-dump",
		"-storage.testdriver=" + driverFile,
		// Files the test driver names (its StorageClass) are relative to it.
		"-repo-root=" + filepath.Dir(driverFile),
		"-system-pods-startup-timeout=1m",
	}
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, c.Bin("ginkgo"), args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// The CLI compares its version with "go list -m" run in the binary's
	// directory, which finds Spool's go.mod, not the tools module e2e.test
	// and the CLI were both built from: without modules it skips the check.
	cmd.Env = append(os.Environ(), "GO111MODULE=off")
	runErr := cmd.Run()
	wall := time.Since(t0)
	// The driver's and sidecars' logs go with the report: the cluster, and
	// /var/log/pods with it, is gone when the run ends.
	if n, err := copyPodLogs("spool-system", filepath.Join(report, "pods")); err != nil {
		t.Logf("copy spool-system pod logs: %v", err)
	} else {
		t.Logf("%d spool-system container logs copied to %s", n, filepath.Join(report, "pods"))
	}

	summary, err := suiteSummary(filepath.Join(report, "e2e.log"))
	if err != nil {
		t.Fatalf("e2e.test (%v): %v; see %s", runErr, err, logFile.Name())
	}
	failed, skips, err := junitResults(filepath.Join(report, "junit_01.xml"))
	if err != nil {
		t.Fatal(err)
	}
	// Why the suite skipped the specs it selected, grouped: the figure to
	// compare with the driver's capabilities.
	var reasons []string
	for r := range skips {
		reasons = append(reasons, r)
	}
	slices.SortFunc(reasons, func(a, b string) int { return cmp.Or(skips[b]-skips[a], strings.Compare(a, b)) })
	for _, r := range reasons {
		t.Logf("skipped %3d: %s", skips[r], r)
	}
	var unexpected []string
	for _, name := range failed {
		if reason, ok := known.match(name); ok {
			t.Logf("known environment failure: %s (%s)", name, reason)
			continue
		}
		unexpected = append(unexpected, name)
	}
	skipped := summary.selected - summary.ran
	t.Logf("external storage suite (%s): %d passed, %d failed, %d skipped of %d selected (of %d specs), in %s",
		filepath.Base(driverFile), summary.passed, summary.failed, skipped, summary.selected, summary.total, wall.Round(time.Second))
	fmt.Printf("%d passed, %d failed, %d skipped\n", summary.passed, summary.failed, skipped)
	for _, u := range unexpected {
		t.Errorf("failed: %s", u)
	}
	if runErr != nil && len(unexpected) == 0 && summary.failed != len(failed) {
		t.Errorf("e2e.test: %v, but the report lists %d failures and the summary %d", runErr, len(failed), summary.failed)
	}
}

// enabledFeatures selects, of the specs tagged [Feature:X], those whose
// features this cluster has: snapshots and group snapshots (the harness
// installs the snapshot CRDs, group snapshot ones included, and runs the
// snapshot-controller, whose group snapshot support is on by default in
// v8), and VolumeAttributesClass (served by this Kubernetes and acted on
// by csi-provisioner and csi-resizer). Specs needing any other feature (Windows,
// SELinux, SnapshotMetadata, ...) do not run. Whether a flavour supports a
// feature is its test-driver file's business: the specs skip themselves
// where it declares no group snapshot class or VolumeAttributesClass.
const enabledFeatures = "Feature: isSubsetOf {VolumeSnapshotDataSource, volumegroupsnapshot, VolumeAttributesClass}"

// copyPodLogs copies the container logs of namespace's pods, as kubelet
// writes them under /var/log/pods/<namespace>_<pod>_<uid>/<container>/, to
// dst/<pod>/<container>/. It returns how many files it copied.
func copyPodLogs(namespace, dst string) (int, error) {
	if err := os.RemoveAll(dst); err != nil {
		return 0, err
	}
	pods, err := filepath.Glob(filepath.Join("/var/log/pods", namespace+"_*"))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, pod := range pods {
		name := strings.Split(filepath.Base(pod), "_")[1]
		files, err := filepath.Glob(filepath.Join(pod, "*", "*.log"))
		if err != nil {
			return n, err
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return n, err
			}
			out := filepath.Join(dst, name, filepath.Base(filepath.Dir(f)), filepath.Base(f))
			if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
				return n, err
			}
			if err := os.WriteFile(out, b, 0o644); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// focusAnd narrows ginkgo's focus: ginkgo ORs repeated --focus flags, so
// the pattern follows External.Storage in one expression, as it does in
// the specs' names.
func focusAnd(re string) string {
	if re == "" {
		return ""
	}
	return ".*(" + re + ")"
}

// suiteCounts: total specs, selected by focus and skip, ran (the rest the
// suite skipped at run time, for want of a capability), passed and failed.
type suiteCounts struct{ total, selected, ran, passed, failed int }

var (
	selectRE = regexp.MustCompile(`Will run (\d+) of (\d+) specs`)
	ranRE    = regexp.MustCompile(`Ran (\d+) of (\d+) Specs`)
	countsRE = regexp.MustCompile(`(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped`)
)

// suiteSummary reads ginkgo's closing lines: "Ran N of M Specs" and
// "P Passed | F Failed | X Pending | S Skipped".
func suiteSummary(log string) (suiteCounts, error) {
	b, err := os.ReadFile(log)
	if err != nil {
		return suiteCounts{}, err
	}
	var s suiteCounts
	w := selectRE.FindSubmatch(b)
	r := ranRE.FindAllSubmatch(b, -1)
	c := countsRE.FindAllSubmatch(b, -1)
	if w == nil || len(r) == 0 || len(c) == 0 {
		return s, fmt.Errorf("no ginkgo summary in %s", log)
	}
	s.selected, _ = strconv.Atoi(string(w[1]))
	s.total, _ = strconv.Atoi(string(w[2]))
	s.ran, _ = strconv.Atoi(string(r[len(r)-1][1]))
	last := c[len(c)-1]
	s.passed, _ = strconv.Atoi(string(last[1]))
	s.failed, _ = strconv.Atoi(string(last[2]))
	return s, nil
}

// junitResults lists the names of the failed specs in a JUnit report, and
// counts the specs skipped at run time by the reason they give (specs the
// focus and skip flags left out say only "skipped" and are not counted).
func junitResults(path string) (failed []string, skips map[string]int, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("JUnit report: %w", err)
	}
	var r struct {
		Suites []struct {
			Cases []struct {
				Name    string    `xml:"name,attr"`
				Status  string    `xml:"status,attr"`
				Failure *struct{} `xml:"failure"`
				Error   *struct{} `xml:"error"`
				Skipped *struct {
					Message string `xml:"message,attr"`
				} `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &r); err != nil {
		return nil, nil, fmt.Errorf("decode %s: %w", path, err)
	}
	skips = map[string]int{}
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			switch {
			case c.Status == "failed" || c.Status == "panicked" || c.Status == "timedout" || c.Failure != nil || c.Error != nil:
				failed = append(failed, c.Name)
			case c.Skipped != nil && c.Skipped.Message != "skipped":
				reason := strings.TrimPrefix(c.Skipped.Message, "skipped - ")
				if i := strings.IndexByte(reason, '\n'); i >= 0 {
					reason = reason[:i]
				}
				skips[reason]++
			}
		}
	}
	return failed, skips, nil
}

// knownEntry is one line of the known environment failures: a spec name
// pattern (substrings that appear in this order, joined by " && "), why it
// fails here, and optionally when to skip it up front rather than wait out
// its timeout: [requires CAP_X] on hosts without the capability (online
// ext4 growth times out after ten minutes; it runs everywhere else), or
// [skip] always, for a spec that cannot pass against the flavour.
type knownEntry struct {
	pattern, reason, requires string
	skip                      bool
}

func (e knownEntry) parts() []string { return strings.Split(e.pattern, " && ") }

// regexp is the pattern as a ginkgo --skip alternative.
func (e knownEntry) regexp() string {
	var q []string
	for _, p := range e.parts() {
		q = append(q, regexp.QuoteMeta(p))
	}
	return strings.Join(q, ".*")
}

func (e knownEntry) matches(name string) bool {
	for _, p := range e.parts() {
		i := strings.Index(name, p)
		if i < 0 {
			return false
		}
		name = name[i+len(p):]
	}
	return true
}

type knownList []knownEntry

func (k knownList) match(name string) (string, bool) {
	for _, e := range k {
		if e.matches(name) {
			return e.reason, true
		}
	}
	return "", false
}

// readKnownFailures reads "[requires CAP] pattern # reason" lines, the
// "[requires CAP] " prefix optional; blank lines and lines starting with #
// are comments.
func readKnownFailures(path string) (knownList, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("known failures: %w", err)
	}
	defer f.Close()
	var k knownList
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var e knownEntry
		if rest, ok := strings.CutPrefix(line, "[skip] "); ok {
			e.skip, line = true, rest
		} else if rest, ok := strings.CutPrefix(line, "[requires "); ok {
			req, after, ok := strings.Cut(rest, "] ")
			if !ok || capabilityBit[req] == 0 {
				return nil, fmt.Errorf("%s: %q: want [requires CAP_NAME] with a known capability", path, line)
			}
			e.requires, line = req, after
		}
		pattern, reason, _ := strings.Cut(line, " # ")
		e.pattern, e.reason = strings.TrimSpace(pattern), strings.TrimSpace(reason)
		if e.reason == "" {
			return nil, fmt.Errorf("%s: %q: every known failure needs a reason after \" # \"", path, line)
		}
		k = append(k, e)
	}
	return k, sc.Err()
}

// capabilityBit names the capabilities a known failure can require, with
// their bit numbers from linux/capability.h.
var capabilityBit = map[string]uint{"CAP_SYS_RESOURCE": 24, "CAP_SYS_ADMIN": 21}

// hostHas reports whether this process (root, as the driver it starts) has
// the capability in its effective set.
func hostHas(capName string) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && eff&(1<<capabilityBit[capName]) != 0
		}
	}
	return false
}

// importSuiteImages makes the images the storage tests use, under the names
// test/utils/image/manifest.go gives them at v1.36.3: agnhost (the busybox
// rootfs plus /agnhost and its libraries), and nginx and glibc-dns-testing,
// for which the busybox rootfs is enough in the storage tests.
func importSuiteImages(ctx context.Context) error {
	c := env.c
	agn, err := cluster.NewBusyboxImage("registry.k8s.io/e2e-test-images/agnhost:2.63.0", "/bin/busybox", []string{"pause"})
	if err != nil {
		return err
	}
	// agnhost is built with cgo, as the cluster binaries are (so a cold
	// build compiles their shared packages once): its libraries come along.
	if err := agn.AddHostBinary(ctx, c.Bin("agnhost"), "/agnhost"); err != nil {
		return err
	}
	agn.Files = append(agn.Files, cluster.File{Path: "/agnhost-2", Symlink: "/agnhost"})
	agn.Entrypoint = []string{"/agnhost"}
	imgs := []*cluster.Image{agn}
	for _, name := range []string{"registry.k8s.io/e2e-test-images/nginx:1.15-4", "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0"} {
		img, err := cluster.NewBusyboxImage(name, "/bin/busybox", []string{"sh"})
		if err != nil {
			return err
		}
		imgs = append(imgs, img)
	}
	return c.ImportImages(ctx, imgs...)
}
