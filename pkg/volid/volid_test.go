package volid

import (
	"errors"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	v, err := New(KindVolume, "fast", "worker-1.example.com")
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(v.String())
	if err != nil {
		t.Fatalf("Parse(%q): %v", v.String(), err)
	}
	if got != v {
		t.Fatalf("Parse(%q) = %+v, want %+v", v.String(), got, v)
	}
	if !strings.HasPrefix(v.String(), "fast:worker-1.example.com:") || len(v.Token) != TokenLen {
		t.Fatalf("unexpected ID %q", v.String())
	}
	w, _ := New(KindVolume, "fast", "worker-1.example.com")
	if w.Token == v.Token {
		t.Fatal("two IDs share a token")
	}
	for _, k := range []Kind{KindSnapshot, KindGroup} {
		id, err := New(k, "fast", "n1")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(id.String(), "fast:n1:"+string(k)+"-") {
			t.Fatalf("%s ID %q", k, id)
		}
		got, err := ParseKind(id.String(), k)
		if err != nil || got != id {
			t.Fatalf("ParseKind(%q): %+v %v", id, got, err)
		}
		if _, err := ParseKind(id.String(), KindVolume); !errors.Is(err, ErrMalformed) {
			t.Fatalf("a %s ID parsed as a volume ID: %v", k, err)
		}
		if len(id.String()) > 128 {
			t.Fatalf("ID too long: %d", len(id.String()))
		}
	}
	if _, err := ParseKind(v.String(), KindSnapshot); !errors.Is(err, ErrMalformed) {
		t.Fatalf("a volume ID parsed as a snapshot ID: %v", err)
	}
}

func TestSharedPoolIDs(t *testing.T) {
	for _, k := range []Kind{KindVolume, KindSnapshot, KindGroup} {
		id, err := New(k, "nfs", "")
		if err != nil {
			t.Fatal(err)
		}
		if !id.Shared() || !strings.HasPrefix(id.String(), "nfs::") {
			t.Fatalf("shared %s ID %q", k, id)
		}
		got, err := ParseKind(id.String(), k)
		if err != nil || got != id || !got.Shared() {
			t.Fatalf("ParseKind(%q) = %+v, %v", id, got, err)
		}
	}
	local, _ := New(KindVolume, "nfs", "n1")
	if local.Shared() {
		t.Fatalf("%q reported shared", local)
	}
}

func TestLongestIDFitsCSILimit(t *testing.T) {
	id := ID{Pool: strings.Repeat("p", MaxPoolNameLen), Node: strings.Repeat("n", MaxNodeIDLen), Kind: KindGroup, Token: strings.Repeat("a", TokenLen)}
	if len(id.String()) > 128 {
		t.Fatalf("longest ID is %d bytes, CSI guarantees 128", len(id.String()))
	}
	if _, err := Parse(id.String()); err != nil {
		t.Fatal(err)
	}
}

func TestParseRejects(t *testing.T) {
	tok := "0123456789abcdef01234567"
	for _, s := range []string{
		"", "fake-vol-id", "a:b", "a:b:c:d",
		"../x:node:" + tok, "pool:node:../" + tok[3:], "pool:node:" + strings.ToUpper(tok),
		"Pool:node:" + tok, "pool:-node:" + tok, "pool:no..de:" + tok, "pool:no/de:" + tok,
		"pool:node:" + tok + "\x00", "pool:node:" + tok + "0", "pool:::" + tok, ":" + tok,
		"pool:node:%2e%2e%2f" + tok[9:], "/abs:node:" + tok, "pool:node:snap-", "pool:node:snap-snap-" + tok,
		"pool:node:other-" + tok, "pool:node:group-../" + tok[3:],
		strings.Repeat("a", 40) + ":node:" + tok, "pool:" + strings.Repeat("n", 64) + ":" + tok,
		strings.Repeat("x", 10000),
	} {
		if _, err := Parse(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q) = %v, want ErrMalformed", s, err)
		}
	}
}

func TestValidateNames(t *testing.T) {
	for _, ok := range []string{"a", "default", "fast-ssd", strings.Repeat("a", 32)} {
		if err := ValidatePoolName(ok); err != nil {
			t.Errorf("ValidatePoolName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", "a-", "A", "a_b", "a.b", "a:b", strings.Repeat("a", 33), "../x"} {
		if err := ValidatePoolName(bad); err == nil {
			t.Errorf("ValidatePoolName(%q) succeeded", bad)
		}
	}
	for _, bad := range []string{"", ".", "..", "a..b", "a/b", "a:b", strings.Repeat("n", 64), "-n"} {
		if err := ValidateNodeID(bad); err == nil {
			t.Errorf("ValidateNodeID(%q) succeeded", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("fast:node-1:0123456789abcdef01234567")
	f.Add("../../etc:passwd:0123456789abcdef01234567")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := Parse(s)
		if err != nil {
			return
		}
		if v.String() != s {
			t.Fatalf("Parse(%q) round-trips to %q", s, v.String())
		}
		if strings.ContainsAny(v.Token, "/.\x00-") || len(v.Token) != TokenLen {
			t.Fatalf("Parse(%q) accepted unsafe token %q", s, v.Token)
		}
	})
}
