package e2e

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/vmm"
)

func waitGone(t *testing.T, runRoot string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(vmm.Pids(runRoot)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU still running: %v", vmm.Pids(runRoot))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// start starts hearth with args and returns it with its stdout; its
// stderr goes to stderr (nil: discarded).
func (h *harness) start(t *testing.T, ctx context.Context, stderr io.Writer, args ...string) (*exec.Cmd, io.ReadCloser) {
	t.Helper()
	cmd := h.command(ctx, args...)
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, stdout
}

// startReady starts hearth running a workload that prints "ready" and
// sleeps, and returns once "ready" arrived, with hearth's stderr so far.
func (h *harness) startReady(t *testing.T, ctx context.Context, img string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	var stderr bytes.Buffer
	cmd, stdout := h.start(t, ctx, &stderr, "run", img, "sh", "-c", "echo ready; sleep 100")
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("no ready line: %q; stderr: %s", line, stderr.String())
	}
	return cmd, &stderr
}

func TestLifecycle(t *testing.T) {
	h := newHarness(t)
	img := tools(t)

	t.Run("SIGTERM to hearth", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd, _ := h.startReady(t, ctx, img)
		start := time.Now()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 128+15 {
			t.Errorf("exit %d, want 143", code)
		}
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("took %s to stop", d)
		}
	})

	t.Run("QEMU dies", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd, stderr := h.startReady(t, ctx, img)
		pids := vmm.Pids(h.runRoot)
		if len(pids) != 1 {
			t.Fatalf("QEMU processes: %v", pids)
		}
		_ = syscall.Kill(pids[0], syscall.SIGKILL)
		_ = cmd.Wait()
		msg := dropWarning(stderr.String())
		if code := cmd.ProcessState.ExitCode(); code != 125 || !strings.Contains(msg, "the VM stopped before the workload finished") {
			t.Errorf("exit %d, stderr %q", code, msg)
		}
	})

	t.Run("hearth SIGKILLed", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd, _ := h.startReady(t, ctx, img)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		// The VM ends with its hearth (PDEATHSIG, or the agent powering
		// off when the channel closes) ...
		waitGone(t, h.runRoot)
		// ... and the next run sweeps the run directory it left.
		if r := h.run("", "run", img, "true"); r.code != 0 {
			t.Fatalf("next run: %d %s", r.code, r.stderr)
		}
	})

	t.Run("Ctrl-C while booting", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := h.command(ctx, "run", img, "sleep", "100")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond) // pulling, or booting
		start := time.Now()
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 130 || !strings.Contains(stderr.String(), "interrupted before the workload started") {
			t.Errorf("exit %d, stderr %q", code, stderr.String())
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("took %s to stop", d)
		}
	})

	t.Run("reader of stdout goes away", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd, stdout := h.start(t, ctx, nil, "run", img, "yes")
		r := bufio.NewReader(stdout)
		for i := 0; i < 3; i++ {
			if line, _ := r.ReadString('\n'); line != "y\n" {
				t.Fatalf("line %d: %q", i, line)
			}
		}
		stdout.Close() // like `hearth run IMG yes | head -3`
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 128+13 {
			t.Errorf("exit %d, want 141 (SIGPIPE)", code)
		}
	})

	t.Run("workload signals PID 1", func(t *testing.T) {
		r := h.run("", "run", img, "sh", "-c", "kill -TERM 1; kill -INT 1; kill -HUP 1; sleep 0.5; echo alive")
		if r.code != 0 || r.stdout != "alive\n" {
			t.Errorf("exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("guest kernel panics", func(t *testing.T) {
		// A Go runtime hit by SIGSEGV from kill(2) crashes; as PID 1 that
		// panics the guest kernel ("Attempted to kill init").
		r := h.run("", "run", img, "sh", "-c", "kill -SEGV 1; sleep 30")
		first, _, _ := strings.Cut(r.stderr, "\n")
		if r.code != 125 || !strings.Contains(first, "the VM stopped before the workload finished: the guest kernel panicked") {
			t.Errorf("exit %d stderr %q", r.code, r.stderr)
		}
	})

	t.Run("zombies reaped", func(t *testing.T) {
		// Orphans are re-parented to the agent, which must reap them.
		r := h.run("", "run", img, "sh", "-c", "for i in 1 2 3 4; do (sleep 0.1 &); done; sleep 1.5; ps -o stat,comm | awk '$1 ~ /^Z/' | wc -l")
		if r.code != 0 || strings.TrimSpace(r.stdout) != "0" {
			t.Errorf("zombies: exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
		}
	})
}
