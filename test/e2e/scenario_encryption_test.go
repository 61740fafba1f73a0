//go:build e2e

package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
)

// Scenario 12: encryption at rest. A Secret and a StorageClass with
// encryption: fscrypt that names it; a pod writes, a second pod reads back;
// the volume's image on the node holds neither the file's content nor its
// name; a snapshot restored with the same class reads back.
func TestEncryption(t *testing.T) {
	independent(t)
	ns := namespace(t)
	class := "spool-e2e-encrypted-" + ns
	key := make([]byte, 48)
	tag := make([]byte, 8)
	_, _ = rand.Read(key)
	_, _ = rand.Read(tag)
	// CSI carries secrets as strings, which must be UTF-8: the key is
	// text, 48 random bytes in base64 (docs/encryption.md).
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata: {name: volume-key, namespace: %s}
stringData: {encryptionKey: %s}
`, ns, base64.StdEncoding.EncodeToString(key)))
	apply(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: %s}
provisioner: spool.csi.dev
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
parameters:
  encryption: fscrypt
  csi.storage.k8s.io/fstype: ext4
  csi.storage.k8s.io/node-stage-secret-name: volume-key
  csi.storage.k8s.io/node-stage-secret-namespace: %s
`, class, ns))
	t.Cleanup(func() { kubectl(t, "delete", "storageclass", class) })

	content := "SPOOL-E2E-PLAINTEXT-" + hex.EncodeToString(tag)
	name := "spool-e2e-name-" + hex.EncodeToString(tag)
	apply(t, pvc(ns, pvcSpec{name: "src", class: class, size: "64Mi"}))
	sum := checksum(t, runPod(t, ns, "writer", "src", fmt.Sprintf("set -e; ls -A /data; printf %s > /data/%s; %s", content, name, writeScript("/data/file", 4)), false, false))
	out := runPod(t, ns, "reader", "src", fmt.Sprintf("set -e; cat /data/%s; echo; %s", name, readScript("/data/file")), false, false)
	if !strings.Contains(out, content) || checksum(t, out) != sum {
		t.Fatalf("the second pod read:\n%s\nwant %s and checksum %s", out, content, sum)
	}
	_, pv := boundPV(t, ns, "src")
	img, err := os.ReadFile(imagePath(t, pv.Spec.CSI.VolumeHandle))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(img, []byte(content)) || bytes.Contains(img, []byte(name)) {
		t.Fatal("the image of an encrypted volume holds the plaintext of a file or its name")
	}

	snapshotClaim(t, ns, "snap", "src")
	apply(t, pvc(ns, pvcSpec{name: "restored", class: class, size: "64Mi",
		dataSource: "    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: snap\n"}))
	out = runPod(t, ns, "restore-reader", "restored", fmt.Sprintf("set -e; cat /data/%s; echo; %s", name, readScript("/data/file")), false, false)
	if !strings.Contains(out, content) || checksum(t, out) != sum {
		t.Fatalf("the restore read:\n%s\nwant %s and checksum %s", out, content, sum)
	}
	kubectl(t, "delete", "volumesnapshot", "snap", "-n", ns, "--wait")
}
