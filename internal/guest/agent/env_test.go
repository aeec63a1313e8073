package agent

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestCompleteEnv(t *testing.T) {
	got := completeEnv([]string{"PATH=/custom", "A=1"}, "box", "/home/app", true)
	want := []string{"PATH=/custom", "A=1", "HOSTNAME=box", "HOME=/home/app", "TERM=xterm"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	got = completeEnv(nil, "", "/", false)
	if getenv(got, "PATH") != defaultPath || getenv(got, "TERM") != "" {
		t.Fatalf("defaults: %q", got)
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "tool")
	plain := filepath.Join(dir, "data")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plain, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if p, err := lookPath("tool", other+":"+dir, "/"); err != nil || p != exe {
		t.Errorf("tool: %q %v", p, err)
	}
	if _, err := lookPath("data", dir, "/"); !errors.Is(err, errNotExecutable) {
		t.Errorf("data: %v, want not executable", err)
	}
	if _, err := lookPath("missing", dir, "/"); !errors.Is(err, errNotFound) {
		t.Errorf("missing: %v, want not found", err)
	}
	if _, err := lookPath(plain, "", "/"); !errors.Is(err, errNotExecutable) {
		t.Errorf("absolute non-executable: %v", err)
	}
	if _, err := lookPath(dir, "", "/"); !errors.Is(err, errNotExecutable) {
		t.Errorf("directory: %v", err)
	}
	// Relative to the working directory, not the agent's.
	if p, err := lookPath("./tool", "", dir); err != nil || p != "./tool" {
		t.Errorf("./tool in %s: %q %v", dir, p, err)
	}
	if p, err := lookPath("tool", ".", dir); err != nil || p != "tool" {
		t.Errorf("tool with PATH=.: %q %v", p, err)
	}
}
