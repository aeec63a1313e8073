package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// execOut runs args in r and returns its stdout.
func execOut(ctx context.Context, t *testing.T, r *Running, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	res, err := r.Exec(ctx, ExecSpec{Args: args}, IO{Stdout: &out, Stderr: &errb})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec %v in %s: %v %+v %s", args, r.boot.Hostname, err, res, errb.String())
	}
	return strings.TrimSpace(out.String())
}

func counter(ctx context.Context, t *testing.T, r *Running) int {
	t.Helper()
	s := execOut(ctx, t, r, "cat", "/tmp/counter")
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("counter %q: %v", s, err)
	}
	return n
}

// TestSnapshotAndFork snapshots a running sandbox whose shell counts in
// memory, and starts ten forks of it at once: each goes on counting from
// where the snapshot caught it, has its own hostname, random stream and
// writable layer; the original runs on.
func TestSnapshotAndFork(t *testing.T) {
	testenv.NeedVMs(t)
	bin := testenv.Binaries(t)
	work := t.TempDir()
	runRoot := filepath.Join(work, "run")
	t.Cleanup(func() { testenv.CheckNoLeaks(t, runRoot) })
	d := &qemu.Driver{}
	rt := &Runtime{
		Images: &image.Store{Dir: filepath.Join(work, "images")}, Driver: d, Accel: vmm.DetectAccel(),
		Kernel: config.Kernel(), Agent: filepath.Join(bin, "hearth-agent"), CacheDir: work, RunRoot: runRoot,
	}
	ref := testenv.OCILayout(t, testenv.BusyboxImage(t, v1.Config{}), "snap")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	targets := make(chan *Running, 1)
	runCtx, stopRun := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() {
		// The count lives in the shell's memory; the file only shows it
		// (renamed into place, so that a read never finds it empty).
		_, err := rt.Run(runCtx, Spec{Image: ref, CPUs: 1, MemoryMiB: 128, DiskMiB: 64, Name: "origin", Snapshottable: true,
			Entrypoint: []string{"sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.05; done"}},
			IO{Stdout: io.Discard, Stderr: io.Discard, Running: func(r *Running) { targets <- r }})
		ran <- err
	}()
	var origin *Running
	select {
	case origin = <-targets:
	case err := <-ran:
		t.Fatalf("the sandbox ended: %v", err)
	}
	defer func() {
		stopRun()
		<-ran
	}()
	// Until the shell has counted a little (the file may not exist yet).
	for {
		var out bytes.Buffer
		res, err := origin.Exec(ctx, ExecSpec{Args: []string{"cat", "/tmp/counter"}}, IO{Stdout: &out, Stderr: io.Discard})
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := strconv.Atoi(strings.TrimSpace(out.String())); res.ExitCode == 0 && n >= 5 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}

	snap := t.TempDir()
	start := time.Now()
	if err := origin.Snapshot(ctx, snap); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	t.Logf("snapshot in %s", time.Since(start).Round(time.Millisecond))
	atSnapshot := counter(ctx, t, origin)
	time.Sleep(300 * time.Millisecond)
	if n := counter(ctx, t, origin); n <= atSnapshot {
		t.Errorf("the original stopped counting after the snapshot: %d then %d", atSnapshot, n)
	}

	const n = 10
	type fork struct {
		*Forked
		err  error
		took time.Duration
	}
	forks := make([]fork, n)
	done := make(chan int, n)
	for i := range forks {
		go func() {
			defer func() { done <- i }()
			dir := filepath.Join(runRoot, fmt.Sprintf("fork-%d", i))
			if err := mkdir(dir); err != nil {
				forks[i].err = err
				return
			}
			start := time.Now()
			forks[i].Forked, forks[i].err = Fork(ctx, d, snap, dir, fmt.Sprintf("fork-%d", i), Nic{}, nil, nil, nil)
			forks[i].took = time.Since(start)
		}()
	}
	for range n {
		<-done
	}
	defer func() {
		for _, f := range forks {
			if f.Forked != nil {
				f.Running.Close()
				f.VM.Kill()
			}
		}
		removeAll(t, runRoot, "fork-")
	}()
	for i, f := range forks {
		if f.err != nil {
			t.Fatalf("fork %d: %v", i, f.err)
		}
		t.Logf("fork %d restored and renamed in %s", i, f.took.Round(time.Millisecond))
	}

	seen := map[string]int{}
	for i, f := range forks {
		c0 := counter(ctx, t, f.Running)
		if c0 < atSnapshot-1 {
			t.Errorf("fork %d counts from %d, below the snapshot's %d", i, c0, atSnapshot)
		}
		out := execOut(ctx, t, f.Running, "sh", "-c", "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
		lines := strings.Split(out, "\n")
		if len(lines) != 2 || lines[0] != fmt.Sprintf("fork-%d", i) || len(lines[1]) != 64 {
			t.Fatalf("fork %d: hostname and random bytes %q", i, out)
		}
		if j, dup := seen[lines[1]]; dup {
			t.Errorf("forks %d and %d read the same 32 bytes from /dev/urandom", j, i)
		}
		seen[lines[1]] = i
		// It counts on (a loop turn is tens of milliseconds under TCG
		// with ten VMs on the host: an exec can be quicker).
		c1 := counter(ctx, t, f.Running)
		for deadline := time.Now().Add(5 * time.Second); c1 <= c0 && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			c1 = counter(ctx, t, f.Running)
		}
		if c1 <= c0 {
			t.Errorf("fork %d does not count on: %d then %d", i, c0, c1)
		}
	}
	// Each fork has a writable layer of its own.
	execOut(ctx, t, forks[0].Running, "sh", "-c", "echo mine > /only-in-fork-0")
	if out := execOut(ctx, t, forks[1].Running, "sh", "-c", "cat /only-in-fork-0 2>/dev/null || echo absent"); out != "absent" {
		t.Errorf("fork 1 sees fork 0's file: %q", out)
	}

	// A snapshot directory without the sandbox's files is refused.
	dir := filepath.Join(runRoot, "fork-bad")
	if err := mkdir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := Fork(ctx, d, t.TempDir(), dir, "bad", Nic{}, nil, nil, nil); !errors.Is(err, vmm.ErrBadSnapshot) {
		t.Errorf("fork of an empty directory: %v, want ErrBadSnapshot", err)
	}
}

// TestOldProtocolRefused: a snapshot of a guest that spoke another
// protocol version is refused, with the reason.
func TestOldProtocolRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, snapshotSandbox), []byte(`{"memory":true,"protocol":4,"start":{"args":["sh"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := ReadSaved(dir)
	if !errors.Is(err, vmm.ErrBadSnapshot) || !strings.Contains(err.Error(), "protocol 4") {
		t.Errorf("a protocol 4 snapshot: %v, want ErrBadSnapshot naming its protocol", err)
	}
}

func mkdir(dir string) error { return os.MkdirAll(dir, 0o700) }

// removeAll removes the directories under root whose names start with
// prefix.
func removeAll(t *testing.T, root, prefix string) {
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := os.RemoveAll(filepath.Join(root, e.Name())); err != nil {
				t.Error(err)
			}
		}
	}
}
