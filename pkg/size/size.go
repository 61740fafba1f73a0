// Package size parses, formats and rounds byte sizes.
package size

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Binary and decimal units accepted by Parse.
const (
	KiB int64 = 1 << 10
	MiB int64 = 1 << 20
	GiB int64 = 1 << 30
	TiB int64 = 1 << 40
)

var units = []struct {
	suffix string
	mult   int64
}{
	// Longest suffixes first so "Gi" is not read as "G" + "i".
	{"Ki", KiB}, {"Mi", MiB}, {"Gi", GiB}, {"Ti", TiB}, {"Pi", 1 << 50},
	{"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}, {"P", 1e15},
}

// ErrOverflow is returned when a size does not fit in an int64.
var ErrOverflow = errors.New("size overflows int64")

// Parse reads a non-negative size such as "1073741824", "512Mi", "10Gi" or
// "5G" (Kubernetes quantity suffixes, integers only).
func Parse(s string) (int64, error) {
	if s == "" || len(s) > 32 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	num, mult := s, int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || strings.HasPrefix(num, "+") {
		return 0, fmt.Errorf("invalid size %q: want a non-negative integer with an optional suffix (Ki, Mi, Gi, Ti, K, M, G, T)", s)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("invalid size %q: %w", s, ErrOverflow)
	}
	return n * mult, nil
}

// RoundUp rounds n up to a multiple of unit (unit > 0, n >= 0). It reports
// ErrOverflow instead of wrapping around.
func RoundUp(n, unit int64) (int64, error) {
	if n < 0 || unit <= 0 {
		return 0, fmt.Errorf("cannot round %d to a multiple of %d", n, unit)
	}
	r := n % unit
	if r == 0 {
		return n, nil
	}
	if n > math.MaxInt64-(unit-r) {
		return 0, ErrOverflow
	}
	return n + unit - r, nil
}

// Format prints n with the largest binary unit that divides it exactly.
func Format(n int64) string {
	for _, u := range []struct {
		s string
		m int64
	}{{"Ti", TiB}, {"Gi", GiB}, {"Mi", MiB}, {"Ki", KiB}} {
		if n != 0 && n%u.m == 0 {
			return strconv.FormatInt(n/u.m, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}
