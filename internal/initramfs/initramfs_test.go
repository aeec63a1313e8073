package initramfs

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/cavaliergopher/cpio"
)

func TestWrite(t *testing.T) {
	var buf bytes.Buffer
	agent := []byte("\x7fELF pretend agent")
	if err := Write(&buf, agent); err != nil {
		t.Fatal(err)
	}
	r := cpio.NewReader(&buf)
	got := map[string]cpio.FileMode{}
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = h.Mode
		if h.Name == "init" {
			body, _ := io.ReadAll(r)
			if !bytes.Equal(body, agent) || h.Mode.Perm() != 0o755 || !h.Mode.IsRegular() {
				t.Errorf("init: mode %v body %q", h.Mode, body)
			}
		}
	}
	for _, d := range []string{"dev", "proc", "sys", "mnt"} {
		if !got[d].IsDir() {
			t.Errorf("%s: %v, want a directory", d, got[d])
		}
	}
}

func TestEnsureCaches(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "hearth-agent")
	if err := os.WriteFile(agent, []byte("v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	p1, err := Ensure(filepath.Join(dir, "cache"), agent)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := Ensure(filepath.Join(dir, "cache"), agent)
	if err != nil || p2 != p1 {
		t.Fatalf("second ensure: %s %v, want %s", p2, err, p1)
	}
	// A rebuilt agent gets a new initramfs.
	if err := os.WriteFile(agent, []byte("version 2"), 0o755); err != nil {
		t.Fatal(err)
	}
	p3, err := Ensure(filepath.Join(dir, "cache"), agent)
	if err != nil || p3 == p1 {
		t.Fatalf("after rebuild: %s %v", p3, err)
	}
	if _, err := Ensure(dir, filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing agent accepted")
	}
}
