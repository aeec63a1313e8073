// Package e2e runs the hearth binary as a user would: real images pushed
// with skopeo to a real docker-registry, real QEMU guests booting hearth's
// kernel, and checks that nothing is left behind after each test.
package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/testenv"
)

var cacheDir string

func TestMain(m *testing.M) {
	// One image cache for the whole package: the same image pushed by
	// several tests converts once.
	dir, err := os.MkdirTemp("", "hearth-e2e-cache-")
	if err != nil {
		panic(err)
	}
	cacheDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	testenv.RemoveBinaries()
	os.Exit(code)
}

type harness struct {
	t       *testing.T
	bin     string
	runRoot string
	env     []string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	testenv.NeedVMs(t)
	bin := testenv.Binaries(t)
	runRoot := filepath.Join(t.TempDir(), "run")
	h := &harness{
		t:       t,
		bin:     filepath.Join(bin, "hearth"),
		runRoot: runRoot,
		env: append(os.Environ(),
			"HEARTH_RUN_DIR="+runRoot,
			"HEARTH_CACHE="+cacheDir,
			"HEARTH_KERNEL="+config.Kernel(),
			"HEARTH_AGENT="+filepath.Join(bin, "hearth-agent"),
			// Local runs: no hearth API, whatever the caller's shell has.
			"KUBECONFIG=",
		),
	}
	t.Cleanup(func() { testenv.CheckNoLeaks(t, runRoot) })
	return h
}

type result struct {
	stdout, stderr string
	code           int
	took           time.Duration
}

// command prepares hearth with args.
func (h *harness) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, h.bin, args...)
	cmd.Env = h.env
	return cmd
}

// run runs hearth to completion with stdin.
func (h *harness) run(stdin string, args ...string) result {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := h.command(ctx, args...)
	var out, errb bytes.Buffer
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: dropWarning(errb.String()), took: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			h.t.Fatalf("hearth itself died of %v; stderr: %s", ws.Signal(), r.stderr)
		}
	} else if err != nil {
		h.t.Fatalf("hearth %v: %v", args, err)
	}
	return r
}

// dropWarning removes hearth's TCG warning, printed on every run on a host
// without KVM, so that tests can compare the workload's stderr exactly.
func dropWarning(s string) string {
	var keep []string
	for _, line := range strings.SplitAfter(s, "\n") {
		if !strings.HasPrefix(line, "hearth: warning: running under TCG") {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "")
}
