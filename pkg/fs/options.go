package fs

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// The mount options a volume's user may ask for (StorageClass mountOptions,
// a PersistentVolume's spec.mountOptions, the kubelet's SELinux context)
// are an allowlist: the generic options every filesystem takes, and for
// each filesystem the options that tune that filesystem alone. Anything
// else is refused, in particular what would reach beyond the volume: an
// option that names a path or a device (logdev=, rtdev=, journal_path=,
// journal_dev=, device=, usrjquota=), makes mount(8) set up another device
// or run a helper (loop, offset=, sizelimit=, uhelper=, helper=), turns
// the mount into another operation (bind, remount, move, make-*), takes
// the node down on a corrupt tenant filesystem (errors=panic,
// fatal_errors=panic), or lets a tenant's files act as devices or setuid
// programs on the host (dev, suid, and defaults, which implies both).

// optKind says what value an option takes.
type optKind int

const (
	optFlag   optKind = iota // no value: noatime
	optNumber                // a decimal number: commit=30
	optSize                  // a number with an optional k, m or g: logbsize=256k
	optEnum                  // one of the listed values: data=ordered
)

type optRule struct {
	kind   optKind
	values []string // optEnum
}

// optRules maps an option's name to the forms it may take (btrfs's
// compress is a flag and takes values too).
type optRules map[string][]optRule

// optSpec lists a filesystem's options by the value they take.
type optSpec struct {
	flags, numbers, sizes []string
	enums                 map[string][]string
}

func (s optSpec) rules() optRules {
	m := optRules{}
	for kind, names := range map[optKind][]string{optFlag: s.flags, optNumber: s.numbers, optSize: s.sizes} {
		for _, n := range names {
			m[n] = append(m[n], optRule{kind: kind})
		}
	}
	for n, values := range s.enums {
		m[n] = append(m[n], optRule{kind: optEnum, values: values})
	}
	return m
}

// genericOptions are the VFS options: mount(8) turns them into mount
// flags, so every filesystem takes them. context= is checked apart.
var genericOptions = optSpec{flags: []string{
	"ro", "rw", "noatime", "atime", "relatime", "norelatime", "strictatime", "nostrictatime",
	"lazytime", "nolazytime", "nodiratime", "diratime", "nosuid", "nodev", "noexec", "exec",
	"nosymfollow", "sync", "async", "dirsync", "iversion", "noiversion",
}}.rules()

// fsOptions are each filesystem's own options.
var fsOptions = map[string]optRules{
	"ext4": optSpec{
		flags: []string{"discard", "nodiscard", "barrier", "nobarrier", "journal_checksum", "nojournal_checksum",
			"journal_async_commit", "delalloc", "nodelalloc", "auto_da_alloc", "noauto_da_alloc",
			"dioread_nolock", "dioread_lock", "nombcache", "block_validity", "noblock_validity",
			"acl", "noacl", "user_xattr", "nouser_xattr", "quota", "usrquota", "grpquota", "prjquota",
			"noquota", "grpid", "bsdgroups", "nogrpid", "sysvgroups", "init_itable", "noinit_itable",
			"noload", "norecovery", "i_version"},
		numbers: []string{"commit", "inode_readahead_blks", "stripe", "max_batch_time", "min_batch_time",
			"journal_ioprio", "resuid", "resgid", "max_dir_size_kb"},
		enums: map[string][]string{
			"barrier": {"0", "1"},
			"data":    {"journal", "ordered", "writeback"},
			"errors":  {"continue", "remount-ro"},
		},
	}.rules(),
	"xfs": optSpec{
		flags: []string{"attr2", "noattr2", "discard", "nodiscard", "grpid", "bsdgroups", "nogrpid", "sysvgroups",
			"filestreams", "ikeep", "noikeep", "inode32", "inode64", "largeio", "nolargeio", "noalign",
			"norecovery", "nouuid", "noquota", "uquota", "usrquota", "uqnoenforce", "quota", "gquota",
			"grpquota", "gqnoenforce", "pquota", "prjquota", "pqnoenforce", "swalloc", "wsync"},
		numbers: []string{"logbufs", "sunit", "swidth"},
		sizes:   []string{"allocsize", "logbsize"},
	}.rules(),
	"btrfs": optSpec{
		flags: []string{"autodefrag", "noautodefrag", "barrier", "nobarrier", "compress", "compress-force",
			"datacow", "nodatacow", "datasum", "nodatasum", "discard", "nodiscard", "flushoncommit",
			"noflushoncommit", "space_cache", "nospace_cache", "ssd", "nossd", "ssd_spread",
			"nossd_spread", "treelog", "notreelog", "acl", "noacl", "user_subvol_rm_allowed"},
		numbers: []string{"commit", "thread_pool"},
		sizes:   []string{"max_inline"},
		enums: map[string][]string{
			"compress":       compressValues(),
			"compress-force": compressValues(),
			"discard":        {"sync", "async"},
			"space_cache":    {"v1", "v2"},
			"rescue":         {"nologreplay"},
		},
	}.rules(),
}

// compressValues are btrfs's compress= values: an algorithm, and for zlib
// and zstd an optional level.
func compressValues() []string {
	v := []string{"zlib", "lzo", "zstd", "no", "none"}
	for l := 1; l <= 9; l++ {
		v = append(v, fmt.Sprintf("zlib:%d", l))
	}
	for l := 1; l <= 15; l++ {
		v = append(v, fmt.Sprintf("zstd:%d", l))
	}
	return v
}

var (
	numberRE = regexp.MustCompile(`^[0-9]{1,12}$`)
	sizeRE   = regexp.MustCompile(`^[0-9]{1,12}[kKmMgG]?$`)
	// An SELinux context user:role:type:level, as the kubelet passes it for
	// an SELinux mount (KEP-1710), in quotes when its categories hold a
	// comma: context="system_u:object_r:container_file_t:s0:c1,c2".
	selinuxContextRE = regexp.MustCompile(`^[a-z0-9_]{1,64}:[a-z0-9_]{1,64}:[a-z0-9_]{1,64}:s[0-9]{1,4}(-s[0-9]{1,4})?(:c[0-9]{1,4}([.,]c[0-9]{1,4})*)?$`)
)

// ValidateMountOptions checks the mount options asked for a volume of
// fsType ("" when the request does not say: then an option of any
// supported filesystem is accepted, and the kernel refuses at mount time
// one that is not the volume's). The error names the option refused.
func ValidateMountOptions(fsType string, opts []string) error {
	for _, o := range opts {
		if err := validateOption(fsType, o); err != nil {
			return err
		}
	}
	return nil
}

func validateOption(fsType, o string) error {
	if o == "" || len(o) > 256 || strings.ContainsAny(o, "\x00\n\r\t\\") {
		return fmt.Errorf("invalid mount option %q", o)
	}
	name, value, hasValue := strings.Cut(o, "=")
	if name == "context" && hasValue {
		ctx := value
		if q, ok := strings.CutPrefix(value, `"`); ok {
			ctx, ok = strings.CutSuffix(q, `"`)
			if !ok {
				return fmt.Errorf("mount option %q: unbalanced quote", o)
			}
		}
		if !selinuxContextRE.MatchString(ctx) || (!strings.HasPrefix(value, `"`) && strings.Contains(ctx, ",")) {
			return fmt.Errorf("mount option %q: not an SELinux context user:role:type:level (quoted when it holds a comma)", o)
		}
		return nil
	}
	if strings.ContainsAny(o, ", \"'") {
		return fmt.Errorf("invalid mount option %q: it must be a single option without commas, spaces or quotes", o)
	}
	if rs, ok := genericOptions[name]; ok {
		return checkValue(o, rs, value, hasValue)
	}
	var tables []optRules
	if fsType != "" {
		tables = append(tables, fsOptions[fsType])
	} else {
		for _, t := range SupportedTypes() {
			tables = append(tables, fsOptions[t])
		}
	}
	var lastErr error
	for _, m := range tables {
		if rs, ok := m[name]; ok {
			if lastErr = checkValue(o, rs, value, hasValue); lastErr == nil {
				return nil
			}
		}
	}
	if lastErr != nil {
		return lastErr
	}
	on := "any supported filesystem"
	if fsType != "" {
		on = fsType
	}
	return fmt.Errorf("mount option %q is not allowed on %s (docs/security.md lists what is)", o, on)
}

// checkValue accepts o if its value fits one of the forms its name takes.
func checkValue(o string, rs []optRule, value string, hasValue bool) error {
	var err error
	for _, r := range rs {
		if err = r.check(o, value, hasValue); err == nil {
			return nil
		}
	}
	return err
}

func (r optRule) check(o, value string, hasValue bool) error {
	switch r.kind {
	case optFlag:
		if hasValue {
			return fmt.Errorf("mount option %q takes no value", o)
		}
	case optNumber:
		if !hasValue || !numberRE.MatchString(value) {
			return fmt.Errorf("mount option %q wants a number", o)
		}
	case optSize:
		if !hasValue || !sizeRE.MatchString(value) {
			return fmt.Errorf("mount option %q wants a size (a number, optionally followed by k, m or g)", o)
		}
	case optEnum:
		if hasValue && slices.Contains(r.values, value) {
			return nil
		}
		return fmt.Errorf("mount option %q is not allowed (allowed values: %s)", o, strings.Join(r.values, ", "))
	}
	return nil
}
