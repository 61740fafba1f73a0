package pool

import (
	"errors"
	"fmt"
)

// Kinds of failure the pool reports. The pool knows nothing of gRPC: the
// driver maps each kind to its code in one place (driver.toStatus). Errors
// of no kind are unexpected failures (I/O errors and the like).
var (
	// ErrNotFound: no such volume, snapshot or group snapshot.
	ErrNotFound = errors.New("not found")
	// ErrExhausted: the pool cannot hold what was asked.
	ErrExhausted = errors.New("not enough space in the pool")
	// ErrInProgress: another call is creating or deleting the same object.
	ErrInProgress = errors.New("operation in progress")
	// ErrTooSmall: a copy would be smaller than what it copies.
	ErrTooSmall = errors.New("too small")
	// ErrUnsupported: the pool's filesystem cannot do what was asked.
	ErrUnsupported = errors.New("not supported by the pool's filesystem")
	// ErrInUse: the object is attached and must be detached first.
	ErrInUse = errors.New("in use")
)

// kindError is an error of one of the kinds above with its own message.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// errorf makes an error of a kind.
func errorf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}
