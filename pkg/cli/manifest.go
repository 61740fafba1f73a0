package cli

import (
	"encoding/json"
	"io"
	"maps"
	"slices"
	"text/template"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/pkg/size"
)

// annProvisionedBy names the provisioner that may delete a PV's volume: the
// external-provisioner deletes the volume of a PV with reclaim policy Delete
// only when this annotation names its driver.
const annProvisionedBy = "pv.kubernetes.io/provisioned-by"

// persistentVolume is the part of a core/v1 PersistentVolume that a
// pre-provisioned Spool volume needs. Spool does not depend on k8s.io/api:
// the fields are few and stable.
type persistentVolume struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   pvMeta `json:"metadata"`
	Spec       pvSpec `json:"spec"`
}

type pvMeta struct {
	Name        string            `json:"name"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type pvSpec struct {
	Capacity                      map[string]string `json:"capacity"`
	VolumeMode                    string            `json:"volumeMode"`
	AccessModes                   []string          `json:"accessModes"`
	PersistentVolumeReclaimPolicy string            `json:"persistentVolumeReclaimPolicy"`
	// StorageClassName is always written: "" means no class, so that only
	// a PVC that asks for no class (or names the PV) binds to it.
	StorageClassName string        `json:"storageClassName"`
	CSI              csiSource     `json:"csi"`
	NodeAffinity     *nodeAffinity `json:"nodeAffinity,omitempty"`
}

type csiSource struct {
	Driver           string            `json:"driver"`
	VolumeHandle     string            `json:"volumeHandle"`
	FSType           string            `json:"fsType,omitempty"`
	VolumeAttributes map[string]string `json:"volumeAttributes,omitempty"`
	// NodeStageSecretRef names an encrypted volume's key Secret.
	NodeStageSecretRef *secretRef `json:"nodeStageSecretRef,omitempty"`
}

type secretRef struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
}

type nodeAffinity struct {
	Required nodeSelector `json:"required"`
}

type nodeSelector struct {
	NodeSelectorTerms []nodeSelectorTerm `json:"nodeSelectorTerms"`
}

type nodeSelectorTerm struct {
	MatchExpressions []nodeSelectorRequirement `json:"matchExpressions"`
}

type nodeSelectorRequirement struct {
	Key      string   `json:"key"`
	Operator string   `json:"operator"`
	Values   []string `json:"values"`
}

// pvOptions are the PV's fields that do not come from the volume.
type pvOptions struct {
	name          string
	driver        string
	fsType        string // "" for a block volume
	reclaimPolicy string
	storageClass  string
	// nodeStageSecret is the Secret of an encrypted volume's key.
	nodeStageSecret *secretRef
}

// newPersistentVolume describes v as the external-provisioner would have:
// volume handle, capacity, the volume context as volume attributes and one
// node selector term per accessible topology.
func newPersistentVolume(o pvOptions, v *csi.Volume) persistentVolume {
	pv := persistentVolume{
		APIVersion: "v1", Kind: "PersistentVolume",
		Metadata: pvMeta{Name: o.name},
		Spec: pvSpec{
			Capacity:                      map[string]string{"storage": size.Format(v.GetCapacityBytes())},
			VolumeMode:                    "Filesystem",
			AccessModes:                   []string{"ReadWriteOnce"},
			PersistentVolumeReclaimPolicy: o.reclaimPolicy,
			StorageClassName:              o.storageClass,
			CSI: csiSource{
				Driver: o.driver, VolumeHandle: v.GetVolumeId(), FSType: o.fsType,
				VolumeAttributes:   maps.Clone(v.GetVolumeContext()),
				NodeStageSecretRef: o.nodeStageSecret,
			},
		},
	}
	if o.fsType == "" {
		pv.Spec.VolumeMode = "Block"
	}
	if o.reclaimPolicy == "Delete" {
		pv.Metadata.Annotations = map[string]string{annProvisionedBy: o.driver}
	}
	var terms []nodeSelectorTerm
	for _, t := range v.GetAccessibleTopology() {
		var term nodeSelectorTerm
		for _, k := range slices.Sorted(maps.Keys(t.GetSegments())) {
			term.MatchExpressions = append(term.MatchExpressions, nodeSelectorRequirement{Key: k, Operator: "In", Values: []string{t.GetSegments()[k]}})
		}
		if len(term.MatchExpressions) > 0 {
			terms = append(terms, term)
		}
	}
	if len(terms) > 0 {
		pv.Spec.NodeAffinity = &nodeAffinity{Required: nodeSelector{NodeSelectorTerms: terms}}
	}
	return pv
}

// pvTemplate writes the PV as YAML. Every string from outside goes through
// q, a JSON string literal, which YAML reads as a double-quoted scalar: no
// value can start a new key, a comment or a document.
var pvTemplate = template.Must(template.New("pv").Funcs(template.FuncMap{"q": quote}).Parse(
	`# volumeHandle: {{q .Spec.CSI.VolumeHandle}}
apiVersion: v1
kind: PersistentVolume
metadata:
  name: {{q .Metadata.Name}}
{{- with .Metadata.Annotations}}
  annotations:
{{- range $k, $v := .}}
    {{q $k}}: {{q $v}}
{{- end}}
{{- end}}
spec:
  capacity:
    storage: {{q .Spec.Capacity.storage}}
  volumeMode: {{.Spec.VolumeMode}}
  accessModes:
{{- range .Spec.AccessModes}}
    - {{.}}
{{- end}}
  persistentVolumeReclaimPolicy: {{.Spec.PersistentVolumeReclaimPolicy}}
  storageClassName: {{q .Spec.StorageClassName}}
  csi:
    driver: {{q .Spec.CSI.Driver}}
    volumeHandle: {{q .Spec.CSI.VolumeHandle}}
{{- with .Spec.CSI.FSType}}
    fsType: {{q .}}
{{- end}}
{{- with .Spec.CSI.VolumeAttributes}}
    volumeAttributes:
{{- range $k, $v := .}}
      {{q $k}}: {{q $v}}
{{- end}}
{{- end}}
{{- with .Spec.CSI.NodeStageSecretRef}}
    nodeStageSecretRef:
      name: {{q .Name}}
      namespace: {{q .Namespace}}
{{- end}}
{{- with .Spec.NodeAffinity}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
{{- range .Required.NodeSelectorTerms}}
        - matchExpressions:
{{- range .MatchExpressions}}
            - key: {{q .Key}}
              operator: {{.Operator}}
              values:
{{- range .Values}}
                - {{q .}}
{{- end}}
{{- end}}
{{- end}}
{{- end}}
`))

// quote returns s as a JSON string literal, which is also a YAML
// double-quoted scalar.
func quote(s string) string {
	b, _ := json.Marshal(s) // a string always marshals
	return string(b)
}

func (pv persistentVolume) writeYAML(w io.Writer) error {
	return pvTemplate.Execute(w, pv)
}
