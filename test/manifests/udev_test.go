// Package manifests checks files Spool ships for the host rather than for
// the cluster.
package manifests

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spool-csi/spool/pkg/pool"
)

// fnmatch turns a udev match pattern (fnmatch(3) without flags: '*' also
// matches '/', '?' one character, '[...]' a class, '|' alternatives) into a
// regular expression.
func fnmatch(t *testing.T, pattern string) *regexp.Regexp {
	t.Helper()
	var alts []string
	for _, alt := range strings.Split(pattern, "|") {
		var b strings.Builder
		for i := 0; i < len(alt); i++ {
			switch c := alt[i]; c {
			case '*':
				b.WriteString(".*")
			case '?':
				b.WriteString(".")
			case '[':
				j := strings.IndexByte(alt[i:], ']')
				if j < 0 {
					t.Fatalf("unclosed class in %q", pattern)
				}
				b.WriteString(alt[i : i+j+1])
				i += j
			default:
				b.WriteString(regexp.QuoteMeta(string(c)))
			}
		}
		alts = append(alts, b.String())
	}
	return regexp.MustCompile("^(?:" + strings.Join(alts, "|") + ")$")
}

// The udev rule in deploy/udev matches the loop devices of Spool's images
// (as a real pool lays them out, also once unlinked) and no others.
func TestUdevRuleMatchesSpoolImages(t *testing.T) {
	rules, err := os.ReadFile("../../deploy/udev/59-spool-loop.rules")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`ATTRS\{loop/backing_file\}!="([^"]+)", GOTO="spool_loop_end"`).FindSubmatch(rules)
	if m == nil {
		t.Fatal("the rule has no backing_file match")
	}
	re := fnmatch(t, string(m[1]))
	kernel := regexp.MustCompile(`KERNEL!="([^"]+)", GOTO="spool_loop_end"`).FindSubmatch(rules)
	if kernel == nil || !fnmatch(t, string(kernel[1])).MatchString("loop7") || !fnmatch(t, string(kernel[1])).MatchString("loop7p1") {
		t.Fatal("the rule does not cover loop devices and their partitions")
	}

	p, err := pool.Open(pool.Spec{Name: "default", Dir: t.TempDir()}, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v, _, err := p.CreateVolume(context.Background(), pool.CreateRequest{Name: "v", CapacityBytes: 1 << 20, Provisioning: pool.Thin, AccessType: pool.Block})
	if err != nil {
		t.Fatal(err)
	}
	img, err := p.ImagePath(v.Token())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{img, img + " (deleted)", "/var/lib/spool/default/volumes/0123456789abcdef01234567/disk.img"} {
		if !re.MatchString(s) {
			t.Errorf("the rule does not match the image %q", s)
		}
	}
	for _, s := range []string{"/var/lib/images/disk.img", "/home/user/vm.qcow2", "/var/lib/spool/default/volumes/x.img", "/var/lib/spool/default/snapshots/0123456789abcdef01234567/data"} {
		if re.MatchString(s) {
			t.Errorf("the rule matches %q, which is no Spool image", s)
		}
	}
}
