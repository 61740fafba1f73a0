//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/xml"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spool-csi/spool/test/e2e/cluster"
)

var (
	externalDriver = flag.String("e2e.external", "", "run the Kubernetes external storage e2e suite with this test-driver.yaml")
	externalReport = flag.String("e2e.external-report", "", "directory for the suite's JUnit report and log")
	knownFailures  = flag.String("e2e.known-failures", "external/known-environment-failures.txt", "failures this sandbox causes, one spec name substring a line")
)

// TestExternalStorageSuite runs k8s.io/kubernetes/test/e2e/storage/external
// (e2e.test, built by hack/e2e-tools.sh --external) against the running
// driver, counts passed, failed and skipped specs, and fails on any failure
// that is not a known limit of this sandbox.
func TestExternalStorageSuite(t *testing.T) {
	if *externalDriver == "" {
		t.Skip("-e2e.external not given (make e2e-external)")
	}
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
	args := []string{
		"-kubeconfig=" + c.Kubeconfig,
		"-provider=skeleton",
		"-kubectl-path=" + c.Bin("kubectl"),
		"-kubelet-root-dir=" + c.KubeletRoot(),
		"-container-runtime-endpoint=unix://" + c.ContainerdSocket(),
		"-report-dir=" + report,
		"-disable-log-dump",
		"-storage.testdriver=" + driverFile,
		"-ginkgo.focus=External.Storage",
		`-ginkgo.skip=Disruptive|Serial|Slow|\[Feature:`,
		"-ginkgo.timeout=90m",
		"-ginkgo.no-color",
		"-system-pods-startup-timeout=1m",
	}
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, c.Bin("e2e.test"), args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	runErr := cmd.Run()
	wall := time.Since(t0)

	summary, err := suiteSummary(filepath.Join(report, "e2e.log"))
	if err != nil {
		t.Fatalf("e2e.test (%v): %v; see %s", runErr, err, logFile.Name())
	}
	failed, err := junitFailures(filepath.Join(report, "junit_01.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var unexpected []string
	for _, name := range failed {
		if reason, ok := known.match(name); ok {
			t.Logf("known environment failure: %s (%s)", name, reason)
			continue
		}
		unexpected = append(unexpected, name)
	}
	t.Logf("external storage suite (%s): %d passed, %d failed, %d skipped of %d selected, in %s",
		filepath.Base(driverFile), summary.passed, summary.failed, summary.skipped, summary.ran+summary.skipped, wall.Round(time.Second))
	fmt.Printf("%d passed, %d failed, %d skipped\n", summary.passed, summary.failed, summary.skipped)
	for _, u := range unexpected {
		t.Errorf("failed: %s", u)
	}
	if runErr != nil && len(unexpected) == 0 && summary.failed != len(failed) {
		t.Errorf("e2e.test: %v, but the report lists %d failures and the summary %d", runErr, len(failed), summary.failed)
	}
}

type suiteCounts struct{ ran, passed, failed, skipped int }

var (
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
	r := ranRE.FindAllSubmatch(b, -1)
	c := countsRE.FindAllSubmatch(b, -1)
	if len(r) == 0 || len(c) == 0 {
		return s, fmt.Errorf("no ginkgo summary in %s", log)
	}
	fmt.Sscan(string(r[len(r)-1][1]), &s.ran)
	last := c[len(c)-1]
	fmt.Sscan(string(last[1]), &s.passed)
	fmt.Sscan(string(last[2]), &s.failed)
	fmt.Sscan(string(last[4]), &s.skipped)
	return s, nil
}

// junitFailures lists the names of the failed specs in a JUnit report.
func junitFailures(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("JUnit report: %w", err)
	}
	var r struct {
		Suites []struct {
			Cases []struct {
				Name    string    `xml:"name,attr"`
				Status  string    `xml:"status,attr"`
				Failure *struct{} `xml:"failure"`
				Error   *struct{} `xml:"error"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	var failed []string
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			if c.Status == "failed" || c.Status == "panicked" || c.Status == "timedout" || c.Failure != nil || c.Error != nil {
				failed = append(failed, c.Name)
			}
		}
	}
	return failed, nil
}

// knownList maps spec name substrings to the reason they fail here.
type knownList []struct{ pattern, reason string }

func (k knownList) match(name string) (string, bool) {
	for _, e := range k {
		if strings.Contains(name, e.pattern) {
			return e.reason, true
		}
	}
	return "", false
}

// readKnownFailures reads "substring  # reason" lines; blank lines and
// lines starting with # are comments.
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
		pattern, reason, _ := strings.Cut(line, " # ")
		k = append(k, struct{ pattern, reason string }{strings.TrimSpace(pattern), strings.TrimSpace(reason)})
	}
	return k, sc.Err()
}

// importSuiteImages makes the images the storage tests use, under the names
// test/utils/image/manifest.go gives them at v1.36.3: agnhost (the busybox
// rootfs plus /agnhost), and nginx and glibc-dns-testing, for which the
// busybox rootfs is enough in the storage tests.
func importSuiteImages(ctx context.Context) error {
	c := env.c
	agn, err := cluster.NewBusyboxImage("registry.k8s.io/e2e-test-images/agnhost:2.63.0", "/bin/busybox", []string{"pause"})
	if err != nil {
		return err
	}
	bin, err := cluster.HostFile(c.Bin("agnhost"), "/agnhost", 0o755)
	if err != nil {
		return err
	}
	agn.Files = append(agn.Files, bin, cluster.File{Path: "/agnhost-2", Symlink: "/agnhost"})
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
