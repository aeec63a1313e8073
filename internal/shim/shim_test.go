package shim

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// fakeShim is a stand-in for hearth-shim that runs until signalled, with
// the run's lock (fd 3) inherited.
func fakeShim(t *testing.T, script string) string {
	exe := filepath.Join(t.TempDir(), "fake-shim")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}

func TestStartAliveStop(t *testing.T) {
	for _, tc := range []struct {
		name, script string
	}{
		{"stops on SIGTERM", "exec sleep 1000"},
		{"killed after the grace period", "trap '' TERM; while :; do sleep 0.05; done"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run-0")
			if _, err := Start(dir, Spec{}, fakeShim(t, tc.script)); err != nil {
				t.Fatal(err)
			}
			if !Alive(dir) {
				t.Fatal("a shim that runs is not alive")
			}
			if _, err := Start(dir, Spec{}, fakeShim(t, tc.script)); err == nil {
				t.Fatal("a second start of the same run succeeded")
			}
			if s, err := ReadState(dir); err != nil || s.Phase != Booting {
				t.Errorf("state before the shim wrote one: %+v, %v", s, err)
			}
			start := time.Now()
			if err := Stop(context.Background(), dir, 500*time.Millisecond); err != nil {
				t.Fatal(err)
			}
			if Alive(dir) {
				t.Error("alive after Stop")
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("Stop took %s", took)
			}
			// Stopping what has ended is a no-op.
			if err := Stop(context.Background(), dir, time.Second); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestStateRoundTrip(t *testing.T) {
	dir := t.TempDir()
	want := State{Phase: Exited, ExitCode: 3, Reason: "Error", Message: "boom", BootMillis: 120}
	if err := writeState(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(dir)
	if err != nil || got != want {
		t.Errorf("ReadState = %+v, %v; want %+v", got, err, want)
	}
}

// A guest's message reaches the API's status at most MaxMessage bytes
// long, valid UTF-8, cut at a rune boundary.
func TestClipMessage(t *testing.T) {
	if got := ClipMessage("short"); got != "short" {
		t.Errorf("short: %q", got)
	}
	long := strings.Repeat("é", 1<<20) + "\xff"
	got := ClipMessage(long)
	if len(got) > MaxMessage || !utf8.ValidString(got) || !strings.HasSuffix(got, "(cut)") {
		t.Errorf("a 2 MiB message: %d bytes, valid %v, %q…", len(got), utf8.ValidString(got), got[len(got)-12:])
	}
	if got := ClipMessage("bad \xff byte"); !utf8.ValidString(got) {
		t.Errorf("invalid UTF-8 kept: %q", got)
	}
}
