package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/testenv"
)

func TestImageCommands(t *testing.T) {
	h := newHarness(t)
	// A cache of this test's own, so that ls and prune see only its images.
	h.env = append(h.env, "HEARTH_CACHE="+t.TempDir())
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}, Env: []string{"IMG=cmds"}}), "cmds:1")

	// On a terminal, pulling shows progress.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := h.command(ctx, "image", "pull", ref)
	ptmx, err := pty.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	var scr screen
	go func() { _, _ = bytesCopy(&scr, ptmx) }()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("pull: %v\n%s", err, scr.String())
	}
	time.Sleep(100 * time.Millisecond)
	ptmx.Close()
	for _, want := range []string{"pulling " + ref, "converting " + ref, ref + " sha256:"} {
		if !strings.Contains(scr.String(), want) {
			t.Errorf("pull on a terminal does not show %q:\n%s", want, scr.String())
		}
	}

	r := h.run("", "image", "ls")
	if r.code != 0 || !strings.Contains(r.stdout, "REFERENCE") || !strings.Contains(r.stdout, ref) || !strings.Contains(r.stdout, "MiB") {
		t.Errorf("ls: %d %q %q", r.code, r.stdout, r.stderr)
	}
	r = h.run("", "run", "--pull", "never", ref, "sh", "-c", "echo $IMG")
	if r.code != 0 || r.stdout != "cmds\n" {
		t.Errorf("run the pulled image with --pull never: %d %q %q", r.code, r.stdout, r.stderr)
	}
	r = h.run("", "image", "rm", ref)
	if r.code != 0 {
		t.Errorf("rm: %d %q", r.code, r.stderr)
	}
	if r = h.run("", "image", "ls"); strings.Contains(r.stdout, ref) {
		t.Errorf("ls after rm: %q", r.stdout)
	}
	if r = h.run("", "image", "rm", ref); r.code != 125 || !strings.Contains(r.stderr, "no image") {
		t.Errorf("rm twice: %d %q", r.code, r.stderr)
	}
	if r = h.run("", "run", "--pull", "never", ref, "true"); r.code != 125 || !strings.Contains(r.stderr, "--pull=never") {
		t.Errorf("run a removed image with --pull never: %d %q", r.code, r.stderr)
	}
	if r = h.run("", "image", "prune"); r.code != 0 {
		t.Errorf("prune: %d %q", r.code, r.stderr)
	}
}

// A registry that is not localhost is reached over HTTPS unless
// --insecure-registry names it.
func TestInsecureRegistry(t *testing.T) {
	h := newHarness(t)
	reg := testenv.StartRegistryOn(t, "127.0.0.2")
	ref := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}), "plain:1")

	r := h.run("", "image", "pull", ref)
	if r.code != 125 || !strings.Contains(r.stderr, "HTTPS") {
		t.Errorf("pull over HTTPS from a plain HTTP registry: %d %q", r.code, r.stderr)
	}
	r = h.run("", "--insecure-registry", reg.Addr, "run", ref, "echo", "over plain HTTP")
	if r.code != 0 || r.stdout != "over plain HTTP\n" {
		t.Errorf("with --insecure-registry: %d %q %q", r.code, r.stdout, r.stderr)
	}
}
