//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spool-csi/spool/pkg/pool"
)

// Scenario 4: attach through the external-attacher. The VolumeAttachment goes
// attached=true, the driver's attach record in the pool names the node, and
// deleting the pod detaches both.
func TestAttach(t *testing.T) {
	independent(t)
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-ext4", size: "64Mi"}))
	apply(t, pod(ns, "holder", "data", "touch /data/ok; sleep 3600", false, false))
	waitJSONPath(t, ns, "pod/holder", ".status.phase", "Running")
	pvName, pv := boundPV(t, ns, "data")

	va := attachmentOf(t, pvName)
	if va == "" {
		t.Fatalf("no VolumeAttachment for PV %s", pvName)
	}
	waitJSONPath(t, "", "volumeattachment/"+va, ".status.attached", "true")
	if got := kubectl(t, "get", "volumeattachment", va, "-o", "jsonpath={.spec.attacher}/{.spec.nodeName}"); got != "spool.csi.dev/"+env.c.NodeName {
		t.Errorf("VolumeAttachment attacher/node = %q", got)
	}
	if nodes := attachRecord(t, pv.Spec.CSI.VolumeHandle); strings.Join(nodes, ",") != env.c.NodeName {
		t.Errorf("driver's attach record names %v, want [%s]", nodes, env.c.NodeName)
	}

	kubectl(t, "delete", "pod", "holder", "-n", ns, "--wait")
	eventually(t, "VolumeAttachment deleted", 2*time.Minute, func() error {
		if va := attachmentOf(t, pvName); va != "" {
			return fmt.Errorf("VolumeAttachment %s still exists", va)
		}
		return nil
	})
	if nodes := attachRecord(t, pv.Spec.CSI.VolumeHandle); len(nodes) != 0 {
		t.Errorf("after detach the driver's attach record still names %v", nodes)
	}
}

func attachmentOf(t *testing.T, pv string) string {
	t.Helper()
	return kubectl(t, "get", "volumeattachments", "-o",
		`jsonpath={range .items[?(@.spec.source.persistentVolumeName=="`+pv+`")]}{.metadata.name}{end}`)
}

// attachRecord reads the nodes the volume is attached to from the driver's
// own record in the pool (volume.json).
func attachRecord(t *testing.T, handle string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(imagePath(t, handle)), pool.MetadataName))
	if err != nil {
		t.Fatalf("read the volume's record: %v", err)
	}
	var v struct {
		Attachments []struct {
			Node string `json:"node"`
		} `json:"attachments"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode volume.json: %v", err)
	}
	var nodes []string
	for _, a := range v.Attachments {
		nodes = append(nodes, a.Node)
	}
	return nodes
}
