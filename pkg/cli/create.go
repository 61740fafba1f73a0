package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
)

const createUsage = `Usage: spool volume create --pool NAME=DIR[,capacity=SIZE] --node-id NODE --size SIZE --name NAME [flags]

Creates a volume in the first --pool, exactly as the driver's CreateVolume
does (same size rounding, capacity accounting and name rules; the same name
with a compatible size and type returns the existing volume), and prints a
PersistentVolume manifest for it, ready for 'kubectl apply -f -'. The
filesystem is made when the volume is first staged, as for every volume.

Flags:
`

// Output formats of create.
const (
	outYAML   = "yaml"
	outJSON   = "json"
	outHandle = "handle"
)

// fsBlock is the --fs value of a raw block volume.
const fsBlock = "block"

// createFlags are the flags of `spool volume create`.
type createFlags struct {
	common
	size          string
	name          string
	pvName        string
	fsType        string
	provisioning  string
	reclaimPolicy string
	storageClass  string
	output        string
	// encryptionSecret is NAMESPACE/NAME of the Secret whose encryptionKey
	// encrypts the volume ("" for none).
	encryptionSecret string
	secretRef        *secretRef
}

func create(args []string, stdout, stderr io.Writer) error {
	var f createFlags
	fl := flag.NewFlagSet("spool volume create", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, createUsage); fl.PrintDefaults() }
	f.register(fl)
	fl.StringVar(&f.size, "size", "", "size of the volume, e.g. 10Gi (Ki, Mi, Gi, Ti or K, M, G, T); rounded up to whole MiB and the filesystem's minimum (required)")
	fl.StringVar(&f.name, "name", "", "name of the volume, the key that makes a repeated create return the same volume; a Kubernetes object name (default: --pv-name)")
	fl.StringVar(&f.pvName, "pv-name", "", "name of the PersistentVolume (default: --name)")
	fl.StringVar(&f.fsType, "fs", fs.DefaultFSType, "filesystem: "+strings.Join(fs.SupportedTypes(), ", ")+", or block for a raw block volume")
	fl.StringVar(&f.provisioning, "provisioning", string(pool.Thin), "thin (sparse image) or thick (preallocated)")
	fl.StringVar(&f.reclaimPolicy, "reclaim-policy", "Retain", "persistentVolumeReclaimPolicy: Retain or Delete (Delete lets the external-provisioner delete the volume with the PV)")
	fl.StringVar(&f.storageClass, "storage-class", "", "storageClassName of the PV (default: none, \"\")")
	fl.StringVar(&f.encryptionSecret, "encryption-secret", "", "NAMESPACE/NAME of a Secret whose field encryptionKey (32 bytes or more) encrypts the volume with fscrypt (ext4 only); the PV names it as its nodeStageSecretRef (see docs/encryption.md)")
	fl.StringVar(&f.output, "o", outYAML, "output: yaml (the PV manifest, the handle in a comment), json, or handle (only the volume handle)")
	fl.StringVar(&f.output, "output", outYAML, "same as -o")
	pos, err := parse(fl, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	req, err := f.check()
	if err != nil {
		return err
	}

	d, err := f.open()
	if err != nil {
		return err
	}
	defer d.Close()
	ctx := context.Background()
	if err := f.checkNode(ctx, d); err != nil {
		return err
	}
	resp, err := d.CreateVolume(ctx, req)
	if status.Code(err) == codes.AlreadyExists {
		return fmt.Errorf("%w: a repeated create returns the existing volume only when its size, --fs and --provisioning fit; choose another --name for a new volume", message(err))
	} else if err != nil {
		return message(err)
	}
	v := resp.GetVolume()
	if asked := req.GetCapacityRange().GetRequiredBytes(); v.GetCapacityBytes() != asked {
		why := "sizes are rounded up to whole MiB and to the filesystem's minimum"
		if rounded, _ := size.RoundUp(max(asked, fs.MinSize(f.fsType)), size.MiB); v.GetCapacityBytes() != rounded {
			why = "the volume of this name already exists with that size"
		}
		fmt.Fprintf(stderr, "note: volume %s holds %s, more than the %s asked for: %s\n", v.GetVolumeId(), size.Format(v.GetCapacityBytes()), f.size, why)
	}
	return f.write(stdout, v)
}

// Kubernetes object names (PV, StorageClass): DNS-1123 subdomains.
var (
	dnsSubdomainRE     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	maxDNSSubdomainLen = 253
)

func checkObjectName(flagName, v string) error {
	if len(v) > maxDNSSubdomainLen || !dnsSubdomainRE.MatchString(v) {
		return usagef("--%s %q: want a Kubernetes object name: at most %d lowercase letters, digits, '-' and '.', starting and ending with a letter or digit", flagName, v, maxDNSSubdomainLen)
	}
	return nil
}

// check validates the flags and builds the CreateVolume request the
// external-provisioner would send for a PVC of this size and type.
func (f *createFlags) check() (*csi.CreateVolumeRequest, error) {
	if err := f.common.check(); err != nil {
		return nil, err
	}
	if f.size == "" {
		return nil, usagef("--size is required")
	}
	n, err := size.Parse(f.size)
	if err != nil {
		return nil, usagef("--size: %v", err)
	}
	if n == 0 {
		return nil, usagef("--size must be more than 0")
	}
	if f.name == "" && f.pvName == "" {
		return nil, usagef("--name (or --pv-name) is required: it makes a repeated create return the same volume")
	}
	if f.name == "" {
		f.name = f.pvName
	}
	if f.pvName == "" {
		f.pvName = f.name
	}
	// The driver takes any name (names never become paths); an operator's
	// name is held to the rules of the PV it normally equals.
	if err := checkObjectName("name", f.name); err != nil {
		return nil, err
	}
	if err := checkObjectName("pv-name", f.pvName); err != nil {
		return nil, err
	}
	if f.storageClass != "" {
		if err := checkObjectName("storage-class", f.storageClass); err != nil {
			return nil, err
		}
	}
	if err := oneOf("fs", f.fsType, append(fs.SupportedTypes(), fsBlock)...); err != nil {
		return nil, err
	}
	if err := oneOf("provisioning", f.provisioning, string(pool.Thin), string(pool.Thick)); err != nil {
		return nil, err
	}
	if err := oneOf("reclaim-policy", f.reclaimPolicy, "Retain", "Delete"); err != nil {
		return nil, err
	}
	if err := oneOf("output", f.output, outYAML, outJSON, outHandle); err != nil {
		return nil, err
	}
	params := map[string]string{driver.ParamPool: f.pools[0].Name, driver.ParamProvisioning: f.provisioning}
	if f.encryptionSecret != "" {
		ns, name, ok := strings.Cut(f.encryptionSecret, "/")
		if !ok {
			return nil, usagef("--encryption-secret %q: want NAMESPACE/NAME", f.encryptionSecret)
		}
		if err := checkObjectName("encryption-secret namespace", ns); err != nil {
			return nil, err
		}
		if err := checkObjectName("encryption-secret name", name); err != nil {
			return nil, err
		}
		f.secretRef = &secretRef{Name: name, Namespace: ns}
		params[driver.ParamEncryption] = pool.EncryptionFscrypt
	}
	vc := &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	if f.fsType == fsBlock {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: f.fsType}}
	}
	return &csi.CreateVolumeRequest{
		Name:               f.name,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: n},
		VolumeCapabilities: []*csi.VolumeCapability{vc},
		Parameters:         params,
	}, nil
}

// createResult is the -o json output.
type createResult struct {
	VolumeHandle     string            `json:"volumeHandle"`
	Name             string            `json:"name"`
	CapacityBytes    int64             `json:"capacityBytes"`
	VolumeMode       string            `json:"volumeMode"`
	FSType           string            `json:"fsType,omitempty"`
	Attributes       map[string]string `json:"volumeAttributes"`
	PersistentVolume persistentVolume  `json:"persistentVolume"`
}

// write prints the result in the chosen format.
func (f *createFlags) write(w io.Writer, v *csi.Volume) error {
	fsType := f.fsType
	if fsType == fsBlock {
		fsType = ""
	}
	pv := newPersistentVolume(pvOptions{
		name: f.pvName, driver: f.driverName, fsType: fsType, reclaimPolicy: f.reclaimPolicy, storageClass: f.storageClass,
		nodeStageSecret: f.secretRef,
	}, v)
	switch f.output {
	case outHandle:
		_, err := fmt.Fprintln(w, v.GetVolumeId())
		return err
	case outJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(createResult{
			VolumeHandle: v.GetVolumeId(), Name: f.name, CapacityBytes: v.GetCapacityBytes(),
			VolumeMode: pv.Spec.VolumeMode, FSType: fsType, Attributes: v.GetVolumeContext(), PersistentVolume: pv,
		})
	}
	return pv.writeYAML(w)
}
