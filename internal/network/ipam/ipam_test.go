package ipam

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestNextRange(t *testing.T) {
	cluster := netip.MustParsePrefix("10.244.0.0/16")
	for _, tc := range []struct {
		used []string
		want string
	}{
		{nil, "10.244.0.0/24"},
		{[]string{"10.244.0.0/24"}, "10.244.1.0/24"},
		{[]string{"10.244.0.0/24", "10.244.2.0/24"}, "10.244.1.0/24"},
		{[]string{"10.244.0.0/23"}, "10.244.2.0/24"},
		{[]string{"10.0.0.0/8"}, ""},
	} {
		var used []netip.Prefix
		for _, u := range tc.used {
			used = append(used, netip.MustParsePrefix(u))
		}
		got, err := NextRange(cluster, 24, used)
		if tc.want == "" {
			if !errors.Is(err, ErrFull) {
				t.Errorf("used %v: got %v, %v; want ErrFull", tc.used, got, err)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("used %v: got %v, %v; want %s", tc.used, got, err, tc.want)
		}
	}
	if _, err := NextRange(cluster, 8, nil); err == nil {
		t.Error("a host range larger than the cluster's was accepted")
	}
}

func TestPool(t *testing.T) {
	p := NewPool(netip.MustParsePrefix("10.244.3.0/29")) // .1 gateway, .2-.6 sandboxes, .7 broadcast
	if err := p.Reserve(netip.MustParseAddr("10.244.3.3"), "restored"); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range []string{"a", "b", "c", "d"} {
		a, err := p.Allocate(o)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, a.String())
	}
	want := []string{"10.244.3.2", "10.244.3.4", "10.244.3.5", "10.244.3.6"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("allocated %v, want %v", got, want)
		}
	}
	if a, _ := p.Allocate("a"); a.String() != "10.244.3.2" {
		t.Errorf("a second Allocate for an owner gave %s", a)
	}
	if _, err := p.Allocate("e"); !errors.Is(err, ErrFull) {
		t.Errorf("a full pool: %v", err)
	}
	if err := p.Reserve(netip.MustParseAddr("10.244.3.2"), "other"); err == nil {
		t.Error("an address leased twice")
	}
	for _, bad := range []string{"10.244.3.1", "10.244.3.7", "10.244.4.2"} {
		if err := p.Reserve(netip.MustParseAddr(bad), "x"); err == nil {
			t.Errorf("reserved %s", bad)
		}
	}
	// A freed address waits Quarantine before it goes to another owner,
	// while another is free; when none is, the one freed longest ago goes,
	// past MinQuarantine.
	now := time.Unix(1000, 0)
	p.Now = func() time.Time { return now }
	b, _ := p.Allocate("b")
	p.Release("b")
	if a, err := p.Allocate("e"); !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), "1 freed in the last 15s are held back") {
		t.Errorf("right after a release: %v, %v", a, err)
	}
	now = now.Add(MinQuarantine - time.Second)
	_, _ = p.Allocate("c")
	p.Release("c")
	if _, err := p.Allocate("e"); !errors.Is(err, ErrFull) {
		t.Errorf("before the least quarantine ends: %v", err)
	}
	now = now.Add(time.Second)
	if a, err := p.Allocate("e"); err != nil || a != b {
		t.Errorf("a full range after %s: %v, %v; want %s, the oldest freed", MinQuarantine, a, err, b)
	}
	if a, err := p.Allocate("f"); !errors.Is(err, ErrFull) {
		t.Errorf("the address freed later is still held back: %v, %v", a, err)
	}
	// With a never-used address free, a quarantined one waits the whole
	// Quarantine.
	wide := NewPool(netip.MustParsePrefix("10.244.5.0/29"))
	wide.Now = p.Now
	first, _ := wide.Allocate("x")
	wide.Release("x")
	now = now.Add(Quarantine - time.Second)
	if a, _ := wide.Allocate("y"); a == first {
		t.Errorf("an address in quarantine went out while others were free: %s", a)
	}
	now = now.Add(time.Second)
	if a, _ := wide.Allocate("z"); a != first {
		t.Errorf("after the whole quarantine: %s, want %s (lowest free)", a, first)
	}
}
