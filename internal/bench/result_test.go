package bench

import (
	"bytes"
	"strings"
	"testing"
)

func TestNewFigure(t *testing.T) {
	for _, c := range []struct {
		value, base, target float64
		better              Better
		ratio               float64
		met                 bool
	}{
		{1200, 1000, 1.2, Lower, 1.2, true},
		{1300, 1000, 1.2, Lower, 1.3, false},
		{900, 1000, 1, Higher, 0.9, false},
		{1100, 1000, 1, Higher, 1.1, true},
	} {
		f := NewFigure("x", c.value, "y", c.base, c.better, c.target)
		if f.Ratio != c.ratio || f.Met == nil || *f.Met != c.met {
			t.Errorf("%v/%v (%s, target %v): ratio %v met %v, want %v %v", c.value, c.base, c.better, c.target, f.Ratio, f.Met, c.ratio, c.met)
		}
	}
	if f := NewFigure("x", 1, "y", 2, Lower, 0); f.Met != nil {
		t.Errorf("no target, yet met is %v", *f.Met)
	}
}

func TestResultRoundTripAndCheck(t *testing.T) {
	r := &Result{Bench: "boot", N: 3, Figure: NewFigure("p50_ms", 1200, "bare_qemu_p50_ms", 1000, Lower, 1.2),
		More: []Figure{NewFigure("p50_ms", 1200, "busybox_p50_ms", 0, Lower, 0)}, Details: map[string]int{"a": 1}}
	line := r.JSON()
	for _, key := range []string{`"bench":"boot"`, `"n":3`, `"figure":"p50_ms"`, `"baseline":"bare_qemu_p50_ms"`, `"ratio":1.2`, `"more":[`} {
		if !strings.Contains(line, key) {
			t.Errorf("%s lacks %s", line, key)
		}
	}
	got, err := ParseResults(strings.NewReader("progress line\n" + line + "\n{\"not\":\"a result\"}\n"))
	if err != nil || len(got) != 1 {
		t.Fatalf("parsed %v, %v", got, err)
	}
	if err := got[0].Check(); err == nil || !strings.Contains(err.Error(), "busybox_p50_ms") {
		t.Errorf("a zero baseline passed the check: %v", err)
	}
	r.More = nil
	if err := r.Check(); err != nil {
		t.Errorf("a good result failed the check: %v", err)
	}
	if err := (&Result{Bench: "api", Error: "boom"}).Check(); err == nil {
		t.Error("a failed benchmark passed the check")
	}
}

func TestCompare(t *testing.T) {
	a := []Result{{Bench: "boot", N: 1, Figure: NewFigure("p50_ms", 1500, "bare", 1000, Lower, 1.2)},
		{Bench: "api", N: 1, Figure: NewFigure("creates_per_sec", 200, "kube", 600, Higher, 1)}}
	b := []Result{{Bench: "boot", N: 1, Figure: NewFigure("p50_ms", 1150, "bare", 1000, Lower, 1.2)},
		{Bench: "api", N: 1, Figure: NewFigure("creates_per_sec", 100, "kube", 600, Higher, 1)},
		{Bench: "warm", N: 1, Figure: NewFigure("claim_p50_ms", 100, "bare", 100, Lower, 1.3)}}
	var out bytes.Buffer
	if err := Compare(&out, a, b); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows:\n%s", out.String())
	}
	for i, want := range []string{"better", "worse", "-"} {
		if !strings.Contains(lines[i+1], want) {
			t.Errorf("row %d: want %q:\n%s", i+1, want, out.String())
		}
	}
}
