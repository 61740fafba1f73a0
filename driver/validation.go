package driver

import (
	"path/filepath"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spool-csi/spool/pkg/fs"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/pkg/size"
	"github.com/spool-csi/spool/pkg/volid"
)

// StorageClass parameters.
const (
	ParamPool         = "pool"
	ParamProvisioning = "provisioning"
	// ParamEncryption: "fscrypt" encrypts the volume's files at rest with
	// a key from the node-stage Secret (encryption.go).
	ParamEncryption = "encryption"
	// Keys with this prefix are set by the sidecars (PVC name, secrets
	// references, ...) and are not Spool's to interpret.
	reservedParamPrefix = "csi.storage.k8s.io/"
)

const (
	// DefaultVolumeSize is used when the CO gives no capacity range.
	DefaultVolumeSize = 1 * size.GiB
	// sizeGranularity: every volume is a whole number of MiB.
	sizeGranularity = size.MiB
	maxNameLen      = 256
	maxPathLen      = 4096
)

// params are the parsed StorageClass parameters.
type params struct {
	pool         string
	provisioning pool.Provisioning
	encryption   string // "" or pool.EncryptionFscrypt
}

// Bounds of the parameters a volume stores in its metadata (the CO's
// csi.storage.k8s.io/ keys included): far beyond what a CO sends, far below
// what would bloat every metadata read.
const (
	maxParams          = 64
	maxParamKeyBytes   = 320 // a Kubernetes qualified name: 253 + "/" + 63
	maxParamValueBytes = 4096
	maxParamsBytes     = 16 << 10
)

// checkParamBounds refuses parameters beyond the bounds above.
func checkParamBounds(in map[string]string) error {
	if len(in) > maxParams {
		return invalidf("%d parameters: at most %d", len(in), maxParams)
	}
	total := 0
	for k, v := range in {
		if len(k) > maxParamKeyBytes || len(v) > maxParamValueBytes {
			return invalidf("parameter %.64q: keys are at most %d bytes, values %d", k, maxParamKeyBytes, maxParamValueBytes)
		}
		total += len(k) + len(v)
	}
	if total > maxParamsBytes {
		return invalidf("parameters of %d bytes: at most %d", total, maxParamsBytes)
	}
	return nil
}

// parseParams validates StorageClass parameters. Unknown keys are refused so
// that a typo in a StorageClass fails loudly instead of being ignored.
func parseParams(in map[string]string) (params, error) {
	if err := checkParamBounds(in); err != nil {
		return params{}, err
	}
	p := params{provisioning: pool.Thin}
	for k, v := range in {
		switch {
		case k == ParamPool:
			if err := volid.ValidatePoolName(v); err != nil {
				return params{}, invalidf("parameter %s: %v", ParamPool, err)
			}
			p.pool = v
		case k == ParamProvisioning:
			switch pool.Provisioning(v) {
			case pool.Thin, pool.Thick:
				p.provisioning = pool.Provisioning(v)
			default:
				return params{}, invalidf("parameter %s=%q: want thin or thick", ParamProvisioning, v)
			}
		case k == ParamEncryption:
			if v != pool.EncryptionFscrypt {
				return params{}, invalidf("parameter %s=%q: want %s (ext4's native encryption; see docs/encryption.md)", ParamEncryption, v, pool.EncryptionFscrypt)
			}
			p.encryption = v
		case strings.HasPrefix(k, reservedParamPrefix):
		default:
			return params{}, invalidf("unknown parameter %q (known: %s, %s, %s)", k, ParamPool, ParamProvisioning, ParamEncryption)
		}
	}
	return p, nil
}

// applyMutableParams applies mutable parameters (a VolumeAttributesClass)
// over the StorageClass parameters. Only provisioning can change after
// creation; every other key is refused.
func applyMutableParams(p *params, in map[string]string) error {
	for k, v := range in {
		if k != ParamProvisioning {
			return invalidf("parameter %q cannot be changed after creation (mutable: %s)", k, ParamProvisioning)
		}
		switch pool.Provisioning(v) {
		case pool.Thin, pool.Thick:
			p.provisioning = pool.Provisioning(v)
		default:
			return invalidf("parameter %s=%q: want thin or thick", ParamProvisioning, v)
		}
	}
	return nil
}

// volumeCaps is what a list of volume capabilities asks for.
type volumeCaps struct {
	accessType pool.AccessType
	fsType     string // "" when not named
	mountFlags []string
}

var supportedModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:   true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
	// Shared pools only (checkModeForPool).
	csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:  true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER: true,
}

// checkCapability validates one capability.
func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return invalidf("volume capability is missing")
	}
	mode := c.GetAccessMode().GetMode()
	if !supportedModes[mode] {
		return invalidf("access mode %s is not supported: a volume has one writer node, or (in shared pools) many readers, or many writers of a raw block device", mode)
	}
	switch t := c.GetAccessType().(type) {
	case *csi.VolumeCapability_Block:
	case *csi.VolumeCapability_Mount:
		fsType := t.Mount.GetFsType()
		if fsType != "" && !fs.Supported(fsType) {
			return invalidf("fsType %q is not supported (supported: %s)", fsType, strings.Join(fs.SupportedTypes(), ", "))
		}
		if err := fs.ValidateMountOptions(fsType, t.Mount.GetMountFlags()); err != nil {
			return invalidf("%v", err)
		}
	default:
		return invalidf("volume capability has neither block nor mount access type")
	}
	return nil
}

// parseCapabilities validates the capabilities of CreateVolume: all must be
// supported and agree on block or mount and on the filesystem.
func parseCapabilities(caps []*csi.VolumeCapability) (volumeCaps, error) {
	if len(caps) == 0 {
		return volumeCaps{}, invalidf("volume capabilities are missing")
	}
	var vc volumeCaps
	for i, c := range caps {
		if err := checkCapability(c); err != nil {
			return volumeCaps{}, err
		}
		t, fsType := accessTypeOf(c)
		if i > 0 && t != vc.accessType {
			return volumeCaps{}, invalidf("volume capabilities mix block and mount access")
		}
		if i > 0 && fsType != "" && vc.fsType != "" && fsType != vc.fsType {
			return volumeCaps{}, invalidf("volume capabilities ask for two filesystems, %s and %s", vc.fsType, fsType)
		}
		vc.accessType = t
		if fsType != "" {
			vc.fsType = fsType
		}
		vc.mountFlags = append(vc.mountFlags, c.GetMount().GetMountFlags()...)
	}
	return vc, nil
}

func accessTypeOf(c *csi.VolumeCapability) (pool.AccessType, string) {
	if c.GetBlock() != nil {
		return pool.Block, ""
	}
	return pool.Mount, c.GetMount().GetFsType()
}

// volumeSize picks the size of a new volume from the capacity range: the
// required bytes (or the default) rounded up to whole MiB and to the
// filesystem's minimum, within the limit.
func volumeSize(r *csi.CapacityRange, fsType string) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, invalidf("capacity range must not be negative (required %d, limit %d)", req, lim)
	}
	if lim > 0 && req > lim {
		return 0, status.Errorf(codes.OutOfRange, "required bytes %d exceed limit bytes %d", req, lim)
	}
	n := req
	if n == 0 {
		n = DefaultVolumeSize
		if lim > 0 && lim < n {
			n = lim
		}
	}
	n = max(n, fs.MinSize(fsType))
	n, err := size.RoundUp(n, sizeGranularity)
	if err != nil {
		return 0, status.Errorf(codes.OutOfRange, "capacity %d bytes is too large", req)
	}
	if lim > 0 && n > lim {
		return 0, status.Errorf(codes.OutOfRange, "the smallest volume Spool can make for this request is %s (whole MiB, %s needs at least %s), above the limit of %d bytes",
			size.Format(n), fsTypeOrDefault(fsType), size.Format(max(fs.MinSize(fsType), sizeGranularity)), lim)
	}
	return n, nil
}

func fsTypeOrDefault(fsType string) string {
	if fsType == "" {
		return fs.DefaultFSType
	}
	return fsType
}

// sizeFits reports whether an existing volume of n bytes satisfies r.
func sizeFits(n int64, r *csi.CapacityRange) bool {
	return n >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || n <= r.GetLimitBytes())
}

// checkPath validates a CO-given staging or target path.
func checkPath(field, p string) (string, error) {
	if p == "" {
		return "", invalidf("%s is missing", field)
	}
	if len(p) > maxPathLen || strings.ContainsRune(p, 0) || !filepath.IsAbs(p) {
		return "", invalidf("%s %q must be an absolute path", field, p)
	}
	return resolveParent(filepath.Clean(p)), nil
}

// resolveParent resolves the symbolic links in the directory that holds
// p, so that p names what the mount table shows (a symlinked kubelet
// directory mounts at the link's target). The last element is never
// followed: whatever is there is checked as it is. A parent that cannot be
// resolved (not made yet) leaves p as it was.
func resolveParent(p string) string {
	dir, err := filepath.EvalSymlinks(filepath.Dir(p))
	if err != nil {
		return p
	}
	return filepath.Join(dir, filepath.Base(p))
}

// checkVolumePath validates the volume path of NodeGetVolumeStats and
// NodeExpandVolume: missing is InvalidArgument; a path that cannot be a
// publish path (relative, NUL, too long) means the volume is not published
// there, NotFound.
func checkVolumePath(id, p string) (string, error) {
	if p == "" {
		return "", invalidf("volume path is missing")
	}
	clean, err := checkPath("volume path", p)
	if err != nil {
		return "", notFoundf("volume %s is not published at %q", id, p)
	}
	return clean, nil
}

// checkName validates a CreateVolume name.
func checkName(name string) error {
	if name == "" {
		return invalidf("name is missing")
	}
	if len(name) > maxNameLen || strings.ContainsRune(name, 0) {
		return invalidf("name must be 1-%d bytes without NUL", maxNameLen)
	}
	return nil
}

// checkNodeCall checks what every node call that names a volume and a CO
// path carries: the volume ID and the path (field names it in errors). It
// returns the cleaned path.
func checkNodeCall(id, field, path string) (string, error) {
	if id == "" {
		return "", invalidf("volume ID is missing")
	}
	return checkPath(field, path)
}
