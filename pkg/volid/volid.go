// Package volid builds and parses the IDs of Spool volumes, snapshots and
// group snapshots.
//
// IDs are self-describing and readable, because administrators type them
// into pre-provisioned PersistentVolumes:
//
//	<pool>:<node>:<token>        volume,   e.g. fast:worker-1:5f2c9a0b7e1d3c4a6b8e0f12
//	<pool>:<node>:snap-<token>   snapshot
//	<pool>:<node>:group-<token>  group snapshot
//	<pool>::<token>              volume of a shared pool, e.g. nfs::5f2c9a0b7e1d3c4a6b8e0f12
//
// pool is the pool name, node the node that owns a local pool (empty for a
// shared pool, which every node that mounts it can use), token a random
// 96-bit hex string that names the object's directory in the pool.
// IDs come from outside (the CO, an operator): Parse checks every field
// against a strict pattern before anything builds a path from it, and only
// the token is ever used as a path element.
package volid

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

const (
	// MaxPoolNameLen bounds pool names so that IDs stay within the 128 bytes
	// every CO must accept.
	MaxPoolNameLen = 32
	// MaxNodeIDLen bounds node IDs for the same reason.
	MaxNodeIDLen = 63
	// TokenLen is the length of a token in hex characters.
	TokenLen = 24
	sep      = ":"
)

var (
	poolRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)
	nodeRE  = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$`)
	tokenRE = regexp.MustCompile(`^[0-9a-f]{24}$`)

	// ErrMalformed is wrapped by every parse error.
	ErrMalformed = errors.New("malformed ID")
)

// Kind is what an ID names.
type Kind string

// Kinds of IDs; the kind is the token's prefix.
const (
	KindVolume   Kind = ""
	KindSnapshot Kind = "snap"
	KindGroup    Kind = "group"
)

// ID is a parsed ID.
type ID struct {
	Pool  string
	Node  string
	Kind  Kind
	Token string
}

// String formats the ID.
func (id ID) String() string {
	tok := id.Token
	if id.Kind != KindVolume {
		tok = string(id.Kind) + "-" + tok
	}
	return id.Pool + sep + id.Node + sep + tok
}

// New returns an ID of the given kind with a fresh random token; node is
// empty for an object of a shared pool.
func New(kind Kind, pool, node string) (ID, error) {
	if err := ValidatePoolName(pool); err != nil {
		return ID{}, err
	}
	if err := validateOwner(node); err != nil {
		return ID{}, err
	}
	tok, err := NewToken()
	if err != nil {
		return ID{}, err
	}
	return ID{Pool: pool, Node: node, Kind: kind, Token: tok}, nil
}

// NewToken returns a random token.
func NewToken() (string, error) {
	b := make([]byte, TokenLen/2)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("reading random token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// Parse parses and validates an ID of any kind.
func Parse(s string) (ID, error) {
	// Bound the work done on hostile input before splitting.
	if len(s) > MaxPoolNameLen+MaxNodeIDLen+len(KindGroup)+1+TokenLen+2 {
		return ID{}, fmt.Errorf("%w: %d bytes is too long", ErrMalformed, len(s))
	}
	parts := strings.Split(s, sep)
	if len(parts) != 3 {
		return ID{}, fmt.Errorf("%w: %q is not <pool>:<node>:<token>", ErrMalformed, s)
	}
	id := ID{Pool: parts[0], Node: parts[1], Token: parts[2]}
	for _, k := range []Kind{KindSnapshot, KindGroup} {
		if rest, ok := strings.CutPrefix(id.Token, string(k)+"-"); ok {
			id.Kind, id.Token = k, rest
		}
	}
	if !poolRE.MatchString(id.Pool) {
		return ID{}, fmt.Errorf("%w: bad pool name in %q", ErrMalformed, s)
	}
	if validateOwner(id.Node) != nil {
		return ID{}, fmt.Errorf("%w: bad node in %q", ErrMalformed, s)
	}
	if !IsToken(id.Token) {
		return ID{}, fmt.Errorf("%w: bad token in %q", ErrMalformed, s)
	}
	return id, nil
}

// ParseKind parses an ID and checks that it names an object of kind k.
func ParseKind(s string, k Kind) (ID, error) {
	id, err := Parse(s)
	if err != nil {
		return ID{}, err
	}
	if id.Kind != k {
		want := "a volume"
		if k != KindVolume {
			want = "a " + string(k) + " ID"
		}
		return ID{}, fmt.Errorf("%w: %q is not %s", ErrMalformed, s, want)
	}
	return id, nil
}

// IsToken reports whether s is a well-formed token (and so safe as a single
// path element).
func IsToken(s string) bool { return tokenRE.MatchString(s) }

// ValidatePoolName checks a pool name (lowercase DNS label, at most 32 bytes).
func ValidatePoolName(name string) error {
	if !poolRE.MatchString(name) {
		return fmt.Errorf("invalid pool name %q: want 1-%d lowercase letters, digits or '-', starting and ending with a letter or digit", name, MaxPoolNameLen)
	}
	return nil
}

// Shared reports whether the ID names an object of a shared pool.
func (id ID) Shared() bool { return id.Node == "" }

// validateOwner checks the node field of an ID: a node ID, or empty for a
// shared pool.
func validateOwner(node string) error {
	if node == "" {
		return nil
	}
	return ValidateNodeID(node)
}

// ValidateNodeID checks a node ID (letters, digits, '.', '_', '-', at most 63 bytes).
func ValidateNodeID(node string) error {
	if !nodeRE.MatchString(node) || strings.Contains(node, "..") {
		return fmt.Errorf("invalid node ID %q: want 1-%d letters, digits, '.', '_' or '-', starting and ending with a letter or digit", node, MaxNodeIDLen)
	}
	return nil
}
