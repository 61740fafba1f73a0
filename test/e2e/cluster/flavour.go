package cluster

import (
	"context"
	"fmt"
	"path"
	"regexp"
	"sort"
	"strings"
)

// imageRE finds the images a rendered manifest names.
var imageRE = regexp.MustCompile(`(?m)^\s*-?\s*image:\s*"?([^"\s]+)"?\s*$`)

// ManifestImages lists the distinct images in rendered manifests.
func ManifestImages(rendered string) []string {
	seen := map[string]bool{}
	for _, m := range imageRE.FindAllStringSubmatch(rendered, -1) {
		seen[m[1]] = true
	}
	var out []string
	for img := range seen {
		out = append(out, img)
	}
	sort.Strings(out)
	return out
}

// ImportDeployImages makes every image the rendered manifests name, under
// exactly that name and tag, and imports it, so the manifests run unchanged:
// Spool's from bin/spool and the host's filesystem tools, the CSI sidecars'
// from the binaries hack/e2e-tools.sh built, and node-driver-registrar and
// livenessprobe from the harness's stand-ins (their modules are not served).
func (c *Cluster) ImportDeployImages(ctx context.Context, rendered, spoolBin string) ([]string, error) {
	names := ManifestImages(rendered)
	var images []*Image
	for _, name := range names {
		repo := name
		if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
			repo = repo[:i]
		}
		var img *Image
		var err error
		switch base := path.Base(repo); base {
		case "spool":
			img, err = NewSpoolImage(ctx, name, spoolBin, c.cfg.Busybox)
		case "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "csi-snapshot-metadata":
			img, err = NewProgramImage(ctx, name, c.Bin(base), base)
		case "csi-node-driver-registrar":
			img, err = NewProgramImage(ctx, name, c.Bin("spool-registrar"), base)
		case "livenessprobe":
			img, err = NewProgramImage(ctx, name, c.Bin("spool-livenessprobe"), base)
		default:
			return nil, fmt.Errorf("the manifests name image %s, which the harness cannot make", name)
		}
		if err != nil {
			return nil, fmt.Errorf("make image %s: %w", name, err)
		}
		images = append(images, img)
	}
	return names, c.ImportImages(ctx, images...)
}
