package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// quantile returns the q-quantile (0 <= q <= 1) of xs, interpolating
// linearly between the closest ranks (numpy's default definition).
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	pos := q * float64(len(s)-1)
	lo, hi := int(math.Floor(pos)), int(math.Ceil(pos))
	return s[lo] + (s[hi]-s[lo])*(pos-float64(lo))
}

// kind says how a figure is printed and which way is better.
type kind struct {
	format func(float64) string
	// higherIsBetter flips the "p90" column to the slow side of a rate:
	// the value that 90% of the runs reached (the 10th percentile).
	higherIsBetter bool
}

var (
	latency = kind{format: formatMs}
	ratioLo = kind{format: formatRatio}                       // a ratio where lower is better
	ratioHi = kind{format: formatRatio, higherIsBetter: true} // a ratio where higher is better
	volRate = kind{format: unitf("%.0f vol/s"), higherIsBetter: true}
	mibRate = kind{format: unitf("%.0f MiB/s"), higherIsBetter: true}
	iops    = kind{format: unitf("%.0f IOPS"), higherIsBetter: true}
	memory  = kind{format: formatMiB}
	percent = kind{format: unitf("%.0f%%")}
)

// slowSide returns the quantile shown in the "p90" column: the 90th
// percentile of a latency, the 10th percentile of a rate.
func (k kind) slowSide(xs []float64) float64 {
	if k.higherIsBetter {
		return quantile(xs, 0.10)
	}
	return quantile(xs, 0.90)
}

// show formats v, or a dash when there is no value.
func (k kind) show(v float64) string {
	if math.IsNaN(v) || k.format == nil {
		return "—"
	}
	return k.format(v)
}

func unitf(f string) func(float64) string {
	return func(v float64) string { return fmt.Sprintf(f, v) }
}

// formatMs prints milliseconds with about three significant digits.
func formatMs(ms float64) string {
	switch {
	case math.IsNaN(ms):
		return "—"
	case ms >= 1000:
		return fmt.Sprintf("%.2f s", ms/1000)
	case ms >= 100:
		return fmt.Sprintf("%.0f ms", ms)
	case ms >= 10:
		return fmt.Sprintf("%.1f ms", ms)
	default:
		return fmt.Sprintf("%.2f ms", ms)
	}
}

func formatRatio(r float64) string { return fmt.Sprintf("%.2f×", r) }

func formatMiB(bytes float64) string { return fmt.Sprintf("%.1f MiB", bytes/(1<<20)) }

// ms converts a duration to float milliseconds, the unit of every latency.
func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// target is what a figure should reach.
type target struct {
	text string
	ok   func(median float64) bool
}

// below is a target the median must stay under.
func below(limit float64, text string) *target {
	return &target{text: text, ok: func(v float64) bool { return v < limit }}
}

// atMost is a target the median must not exceed.
func atMost(limit float64, text string) *target {
	return &target{text: text, ok: func(v float64) bool { return v <= limit }}
}

// atLeast is a target the median must reach.
func atLeast(limit float64, text string) *target {
	return &target{text: text, ok: func(v float64) bool { return v >= limit }}
}

// row is one line of the results table.
type row struct {
	figure       string
	median, slow float64
	kind         kind
	target       *target // nil: the figure is for information
	reason       string  // why a target was missed, when the bench can tell
	err          error   // the figure could not be measured
}

// summary is a row made of samples.
func summary(figure string, xs []float64, k kind, t *target) row {
	return row{figure: fmt.Sprintf("%s (n=%d)", figure, len(xs)), median: quantile(xs, 0.5), slow: k.slowSide(xs), kind: k, target: t}
}

// missed reports whether the row has a target its median does not reach.
func (r row) missed() bool {
	return r.err == nil && r.target != nil && !r.target.ok(r.median)
}

// renderTable prints the rows as a Markdown table.
func renderTable(rows []row) string {
	var b strings.Builder
	b.WriteString("| figure | median | p90 | target | met? |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		tgt, met := "—", "—"
		if r.target != nil {
			tgt = r.target.text
		}
		med, slow := r.kind.show(r.median), r.kind.show(r.slow)
		switch {
		case r.err != nil:
			med, slow, met = "error: "+cell(r.err.Error()), "", "**error**"
		case r.target == nil:
		case r.target.ok(r.median):
			met = "yes"
		default:
			met = "**no**" // the reason goes in the list under the table
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", cell(r.figure), med, slow, tgt, met)
	}
	return b.String()
}

// cell makes text safe inside a Markdown table cell.
func cell(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	return strings.Join(strings.Fields(s), " ")
}
