package main

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestQuantile(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	for _, c := range []struct{ q, want float64 }{{0, 1}, {0.5, 3}, {0.9, 4.6}, {1, 5}} {
		if got := quantile(xs, c.q); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("quantile(%v, %v) = %v, want %v", xs, c.q, got, c.want)
		}
	}
	if !math.IsNaN(quantile(nil, 0.5)) {
		t.Error("quantile of no samples is not NaN")
	}
}

func TestRenderTable(t *testing.T) {
	rows := []row{
		summary("fast enough", []float64{1, 2, 3}, latency, below(10, "< 10 ms")),
		summary("too slow", []float64{20, 30}, latency, below(10, "< 10 ms")),
		summary("rate", []float64{10, 20, 30}, volRate, nil),
		{figure: "broken", err: errors.New("a | b")},
		{figure: "peak", median: 1 << 20, slow: math.NaN(), kind: memory},
	}
	rows[1].reason = "CPU-bound"
	out := renderTable(rows)
	for _, want := range []string{
		"| fast enough (n=3) | 2.00 ms | 2.80 ms | < 10 ms | yes |",
		"| too slow (n=2) | 25.0 ms | 29.0 ms | < 10 ms | **no** |",
		"| rate (n=3) | 20 vol/s | 12 vol/s | — | — |",
		`| broken | error: a \| b |  | — | **error** |`,
		"| peak | 1.0 MiB | — | — | — |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestWindowRates(t *testing.T) {
	// Ten calls of 10 ms in two windows: 100 calls per second each.
	lat := []float64{10, 10, 10, 10, 10, 10, 10, 10, 10, 10}
	got := windowRates(lat, 2)
	if len(got) != 2 || math.Abs(got[0]-100) > 1e-9 || math.Abs(got[1]-100) > 1e-9 {
		t.Errorf("windowRates = %v, want [100 100]", got)
	}
}

func TestLogEvent(t *testing.T) {
	dir := t.TempDir()
	started := time.Date(2026, 3, 4, 10, 20, 30, 0, time.Local)
	log := "old line from an earlier process\n" +
		`I0304 10:20:30.250000    4242 pool.go:238] "Opened pool" pool="default" volumes=1000` + "\n" +
		`I0304 10:20:30.400000    4242 driver.go:190] "Serving CSI" driver="spool.csi.dev"` + "\n"
	path := filepath.Join(dir, "spool.log")
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &driverProc{logPath: path, started: started, logStart: int64(len("old line from an earlier process\n"))}
	for msg, want := range map[string]time.Duration{"Opened pool": 250 * time.Millisecond, "Serving CSI": 400 * time.Millisecond} {
		if got, ok := d.logEvent(msg); !ok || got != want {
			t.Errorf("logEvent(%q) = %v, %v; want %v", msg, got, ok, want)
		}
	}
	if _, ok := d.logEvent("Never logged"); ok {
		t.Error("found a message that was never logged")
	}
}

func TestToken(t *testing.T) {
	for id, want := range map[string]string{
		"default:bench-node:5f2c9a0b7e1d3c4a6b8e0f12":      "5f2c9a0b7e1d3c4a6b8e0f12",
		"default:bench-node:snap-5f2c9a0b7e1d3c4a6b8e0f12": "5f2c9a0b7e1d3c4a6b8e0f12",
	} {
		if got := token(id); got != want {
			t.Errorf("token(%q) = %q, want %q", id, got, want)
		}
	}
}
