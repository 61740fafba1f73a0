// Package keylock provides non-blocking locks keyed by string (a volume ID,
// a volume name). A busy key is reported at once so that the CSI handler can
// answer Aborted instead of queueing the CO's retries behind a long
// operation.
package keylock

import "sync"

// Set is a set of held keys. The zero value is ready to use.
type Set struct {
	mu   sync.Mutex
	held map[string]struct{}
}

// TryLock takes key and reports whether it was free.
func (s *Set) TryLock(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held == nil {
		s.held = map[string]struct{}{}
	}
	if _, busy := s.held[key]; busy {
		return false
	}
	s.held[key] = struct{}{}
	return true
}

// Unlock releases key.
func (s *Set) Unlock(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.held, key)
}
