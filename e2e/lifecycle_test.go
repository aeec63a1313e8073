package e2e

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// vmmPids lists QEMU processes whose command line names runRoot.
func vmmPids(runRoot string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte("qemu-system")) && bytes.Contains(b, []byte(runRoot)) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitGone(t *testing.T, runRoot string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(vmmPids(runRoot)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU still running: %v", vmmPids(runRoot))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLifecycle(t *testing.T) {
	h := newHarness(t)
	img := tools(t)

	t.Run("SIGTERM to hearth", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := h.command(ctx, "run", img, "sh", "-c", "echo ready; sleep 100")
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
			t.Fatalf("no ready line: %q", line)
		}
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
		cmd := h.command(ctx, "run", img, "sh", "-c", "echo ready; sleep 100")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
			t.Fatalf("no ready line: %q", line)
		}
		pids := vmmPids(h.runRoot)
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
		cmd := h.command(ctx, "run", img, "sh", "-c", "echo ready; sleep 100")
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
			t.Fatalf("no ready line: %q", line)
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		// QEMU dies with its parent (PDEATHSIG) ...
		waitGone(t, h.runRoot)
		// ... and the next run sweeps the run directory it left.
		if r := h.run("", "run", img, "true"); r.code != 0 {
			t.Fatalf("next run: %d %s", r.code, r.stderr)
		}
	})
}
