// Package volid builds and parses Spool volume IDs.
//
// A volume ID is self-describing and readable, because administrators type
// it into pre-provisioned PersistentVolumes:
//
//	<pool>:<node>:<token>      e.g. fast:worker-1:5f2c9a0b7e1d3c4a6b8e0f12
//
// pool is the pool name, node the node that owns a local pool, token a
// random 96-bit hex string that names the volume's directory in the pool.
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
	ErrMalformed = errors.New("malformed volume ID")
)

// Volume is a parsed volume ID.
type Volume struct {
	Pool  string
	Node  string
	Token string
}

// String formats the ID.
func (v Volume) String() string {
	return v.Pool + sep + v.Node + sep + v.Token
}

// New returns an ID with a fresh random token.
func New(pool, node string) (Volume, error) {
	if err := ValidatePoolName(pool); err != nil {
		return Volume{}, err
	}
	if err := ValidateNodeID(node); err != nil {
		return Volume{}, err
	}
	tok, err := NewToken()
	if err != nil {
		return Volume{}, err
	}
	return Volume{Pool: pool, Node: node, Token: tok}, nil
}

// NewToken returns a random token.
func NewToken() (string, error) {
	b := make([]byte, TokenLen/2)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("reading random token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// Parse parses and validates a volume ID.
func Parse(s string) (Volume, error) {
	// Bound the work done on hostile input before splitting.
	if len(s) > MaxPoolNameLen+MaxNodeIDLen+TokenLen+2 {
		return Volume{}, fmt.Errorf("%w: %d bytes is too long", ErrMalformed, len(s))
	}
	parts := strings.Split(s, sep)
	if len(parts) != 3 {
		return Volume{}, fmt.Errorf("%w: %q is not <pool>:<node>:<token>", ErrMalformed, s)
	}
	v := Volume{Pool: parts[0], Node: parts[1], Token: parts[2]}
	if !poolRE.MatchString(v.Pool) {
		return Volume{}, fmt.Errorf("%w: bad pool name in %q", ErrMalformed, s)
	}
	if !nodeRE.MatchString(v.Node) || strings.Contains(v.Node, "..") {
		return Volume{}, fmt.Errorf("%w: bad node in %q", ErrMalformed, s)
	}
	if !IsToken(v.Token) {
		return Volume{}, fmt.Errorf("%w: bad token in %q", ErrMalformed, s)
	}
	return v, nil
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

// ValidateNodeID checks a node ID (letters, digits, '.', '_', '-', at most 63 bytes).
func ValidateNodeID(node string) error {
	if !nodeRE.MatchString(node) || strings.Contains(node, "..") {
		return fmt.Errorf("invalid node ID %q: want 1-%d letters, digits, '.', '_' or '-', starting and ending with a letter or digit", node, MaxNodeIDLen)
	}
	return nil
}
