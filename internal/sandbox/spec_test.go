package sandbox

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestArgv(t *testing.T) {
	for _, tc := range []struct {
		name       string
		entry, cmd []string
		given      []string
		want       []string
		entrypoint []string // Kubernetes' command
	}{
		{"cmd only", nil, []string{"sh"}, nil, []string{"sh"}, nil},
		{"command replaces cmd", nil, []string{"sh"}, []string{"echo", "hi"}, []string{"echo", "hi"}, nil},
		{"entrypoint and cmd", []string{"/bin/sh", "-c"}, []string{"echo default"}, nil, []string{"/bin/sh", "-c", "echo default"}, nil},
		{"entrypoint and command", []string{"/bin/sh", "-c"}, []string{"echo default"}, []string{"echo x"}, []string{"/bin/sh", "-c", "echo x"}, nil},
		{"nothing", nil, nil, nil, nil, nil},
		{"kubernetes command drops both", []string{"/bin/sh", "-c"}, []string{"echo default"}, nil, []string{"echo"}, []string{"echo"}},
		{"kubernetes command and args", []string{"/bin/sh"}, []string{"x"}, []string{"a", "b"}, []string{"ls", "a", "b"}, []string{"ls"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := argv(v1.Config{Entrypoint: tc.entry, Cmd: tc.cmd}, tc.entrypoint, tc.given)
			if len(got) == 0 && len(tc.want) == 0 {
				return
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"PATH=/bin", "A=1", "B=2"}, []string{"A=override", "C=3", "NOVALUE"})
	want := []string{"PATH=/bin", "A=override", "B=2", "C=3"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestValidate(t *testing.T) {
	ok := Spec{Image: "x", CPUs: 1, MemoryMiB: 256, DiskMiB: 1024}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		mod  func(*Spec)
		want string
	}{
		{func(s *Spec) { s.Image = "" }, "no image"},
		{func(s *Spec) { s.CPUs = 0 }, "--cpus 0"},
		{func(s *Spec) { s.MemoryMiB = 16 }, "too small to boot"},
		{func(s *Spec) { s.DiskMiB = 1 }, "--disk 1MiB"},
		{func(s *Spec) { s.Env = []string{"=x"} }, "has no name"},
	} {
		s := ok
		tc.mod(&s)
		if err := s.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want %q", err, tc.want)
		}
	}
}

func TestCredit(t *testing.T) {
	c := newCredit(10)
	if got := c.take(4); got != 4 {
		t.Fatalf("take 4: %d", got)
	}
	if got := c.take(100); got != 6 {
		t.Fatalf("take rest: %d", got)
	}
	done := make(chan int)
	go func() { done <- c.take(5) }()
	if err := c.add(3); err != nil {
		t.Fatal(err)
	}
	if got := <-done; got != 3 {
		t.Fatalf("after ack: %d", got)
	}
	c.close()
	if got := c.take(1); got != 0 {
		t.Fatalf("after close: %d", got)
	}
}

// The guest's acknowledgements are checked against what is in flight: a
// negative, zero or excessive one is a protocol error and the window is
// unchanged.
func TestCreditRejectsBadAcks(t *testing.T) {
	c := newCredit(10)
	c.take(4)
	for _, n := range []int{-5, 0, 5, math.MaxInt} {
		if err := c.add(n); !errors.Is(err, ErrGuestProtocol) {
			t.Errorf("ack of %d with 4 in flight: %v, want ErrGuestProtocol", n, err)
		}
	}
	if err := c.add(4); err != nil {
		t.Fatal(err)
	}
	if got := c.take(100); got != 10 {
		t.Errorf("window after bad acks: %d, want 10", got)
	}
}
