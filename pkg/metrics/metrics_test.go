package metrics

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Scrapes read the pools and count loop devices at most once per
// collectEvery, however many arrive at once.
func TestCollectsAtMostOncePerInterval(t *testing.T) {
	var reads atomic.Int32
	m := New(nil, func() (int, error) { reads.Add(1); return 3, nil })
	m.pools.every = time.Hour // however slow the machine, one interval
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := m.reg.Gather(); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := reads.Load(); n != 1 {
		t.Fatalf("20 concurrent scrapes read the node %d times, want 1", n)
	}
	m.pools.mu.Lock()
	m.pools.every = 0 // the interval has passed
	m.pools.mu.Unlock()
	if _, err := m.reg.Gather(); err != nil {
		t.Fatal(err)
	}
	if n := reads.Load(); n != 2 {
		t.Fatalf("a scrape after the interval: %d reads, want 2", n)
	}
}
