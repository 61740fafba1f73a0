// The external storage tier (test/e2e/external_test.go) runs only the
// External.Storage specs of the Kubernetes e2e suite. Upstream's e2e.test
// (go test -c k8s.io/kubernetes/test/e2e) links every e2e package, each suite
// with its specs and dependencies; this TestMain mirrors upstream's
// test/e2e/e2e_test.go (v1.36.3) but links only the framework, the suite
// setup in package e2e, and test/e2e/storage/external, so `go test -c
// ./e2estorage` builds a smaller e2e.test that selects the same specs.
//
// Left out with the other suites: logcheck's flags (-logcheck-*),
// -list-conformance-tests, and upstream's progress and -spec-dump reporters
// (they use package e2e's unexported progressReporter; the harness uses
// neither).
package e2estorage

import (
	"flag"
	"fmt"
	"os"
	"testing"

	// Never remove the line with "/ginkgo": the ginkgo CLI looks for it to
	// recognise a suite (kubernetes#74827).
	// "github.com/onsi/ginkgo/v2"

	"k8s.io/component-base/version"
	"k8s.io/kubernetes/test/e2e"
	"k8s.io/kubernetes/test/e2e/framework"
	"k8s.io/kubernetes/test/e2e/framework/config"
	"k8s.io/kubernetes/test/e2e/framework/testfiles"
	e2etestingmanifests "k8s.io/kubernetes/test/e2e/testing-manifests"
	testfixtures "k8s.io/kubernetes/test/fixtures"

	// define and freeze constants
	_ "k8s.io/kubernetes/test/e2e/feature"

	// test sources: -storage.testdriver defines the External.Storage specs
	_ "k8s.io/kubernetes/test/e2e/storage/external"

	// reconfigure framework
	_ "k8s.io/kubernetes/test/e2e/framework/debug/init"
	_ "k8s.io/kubernetes/test/e2e/framework/metrics/init"
	_ "k8s.io/kubernetes/test/e2e/framework/node/init"
	_ "k8s.io/kubernetes/test/utils/format"
)

func TestMain(m *testing.M) {
	versionFlag := flag.Bool("version", false, "Displays version information.")
	config.CopyFlags(config.Flags, flag.CommandLine)
	framework.RegisterCommonFlags(flag.CommandLine)
	framework.RegisterClusterFlags(flag.CommandLine)
	flag.Parse()

	if *versionFlag {
		fmt.Printf("%s\n", version.Get())
		os.Exit(0)
	}
	if flag.CommandLine.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unknown additional command line arguments: %s", flag.CommandLine.Args())
		os.Exit(1)
	}

	// Embedded files, then -repo-root (where the test driver's files are).
	testfiles.AddFileSource(e2etestingmanifests.GetE2ETestingManifestsFS())
	testfiles.AddFileSource(testfixtures.GetTestFixturesFS())
	framework.AfterReadingAllFlags(&framework.TestContext)
	if framework.TestContext.RepoRoot != "" {
		testfiles.AddFileSource(testfiles.RootFileSource{Root: framework.TestContext.RepoRoot})
	}

	os.Exit(m.Run())
}

func TestE2E(t *testing.T) {
	e2e.RunE2ETests(t)
}
