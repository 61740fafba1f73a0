package size

import (
	"errors"
	"math"
	"testing"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "1": 1, "1024": 1024, "1Ki": 1024, "64Mi": 64 << 20, "10Gi": 10 << 30, "2Ti": 2 << 40,
		"5G": 5e9, "3k": 3000, "7M": 7e6,
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "+1", "1.5Gi", "Gi", "1Gib", "1 Gi", "0x10", "9223372036854775807Ki", "99999999999999999999"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
	if _, err := Parse("9000000Ti"); !errors.Is(err, ErrOverflow) {
		t.Errorf("Parse overflow: %v", err)
	}
}

func TestRoundUp(t *testing.T) {
	for _, c := range []struct{ n, unit, want int64 }{
		{0, MiB, 0}, {1, MiB, MiB}, {MiB, MiB, MiB}, {MiB + 1, MiB, 2 * MiB}, {300<<20 - 1, MiB, 300 << 20},
	} {
		if got, err := RoundUp(c.n, c.unit); err != nil || got != c.want {
			t.Errorf("RoundUp(%d, %d) = %d, %v; want %d", c.n, c.unit, got, err, c.want)
		}
	}
	if _, err := RoundUp(math.MaxInt64-1, MiB); !errors.Is(err, ErrOverflow) {
		t.Errorf("RoundUp near MaxInt64: %v, want ErrOverflow", err)
	}
	if _, err := RoundUp(-1, MiB); err == nil {
		t.Error("RoundUp(-1) succeeded")
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 1: "1", 1024: "1Ki", 3 << 20: "3Mi", 10 << 30: "10Gi", 1025: "1025"} {
		if got := Format(n); got != want {
			t.Errorf("Format(%d) = %q, want %q", n, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"1Gi", "0", "9223372036854775807", "8Ei", "-5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err == nil && n < 0 {
			t.Fatalf("Parse(%q) = %d: negative", s, n)
		}
		if err == nil {
			if r, err := RoundUp(n, MiB); err == nil && (r < n || r%MiB != 0) {
				t.Fatalf("RoundUp(%d) = %d", n, r)
			}
		}
	})
}
