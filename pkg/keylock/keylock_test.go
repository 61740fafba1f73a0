package keylock

import (
	"sync"
	"sync/atomic"
	"testing"
)

func TestTryLock(t *testing.T) {
	var s Set
	if !s.TryLock("a") || s.TryLock("a") {
		t.Fatal("a key must be held by one caller at a time")
	}
	if !s.TryLock("b") {
		t.Fatal("keys must be independent")
	}
	s.Unlock("a")
	if !s.TryLock("a") {
		t.Fatal("Unlock must release the key")
	}
}

func TestOneWinnerUnderContention(t *testing.T) {
	var s Set
	var wins atomic.Int32
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s.TryLock("vol") {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d callers took the same key", wins.Load())
	}
}
