package shim

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestMigrate moves a running sandbox from one hearth-shim to an
// incoming one, as two hosts' node agents do (the stream socket passed
// to the source's shim over its API, the other end the target's fd 4):
// the workload counts on in the target, each number logged once across
// the two runs' logs, an exec there reads its disk, the source's run ends
// Migrated and the target's with the workload's exit. First a target
// whose spec has another machine refuses: its run ends MigrationFailed
// and the source runs on. Nothing is left behind on either host.
func TestMigrate(t *testing.T) {
	testenv.NeedVMs(t)
	bin := testenv.Binaries(t)
	t.Setenv("HEARTH_AGENT", filepath.Join(bin, "hearth-agent"))
	t.Setenv("HEARTH_JAILER", filepath.Join(bin, "hearth-jailer"))
	exe := filepath.Join(bin, "hearth-shim")
	work := t.TempDir()
	ref := testenv.OCILayout(t, testenv.BusyboxImage(t, v1.Config{}), "shim-migrate")
	specOn := func(name string) Spec {
		h, err := sandbox.HostFromEnv("")
		if err != nil {
			t.Fatal(err)
		}
		h.CacheDir, h.RunRoot = filepath.Join(work, "cache"), filepath.Join(work, name, "vms")
		t.Cleanup(func() { testenv.CheckNoLeaks(t, h.RunRoot) })
		return Spec{
			Sandbox: sandbox.Spec{Image: ref, CPUs: 1, MemoryMiB: 128, DiskMiB: 64, Name: "mover", Snapshottable: true,
				Entrypoint: []string{"sh", "-c", "i=0; while [ $i -lt 80 ]; do i=$((i+1)); echo $i; echo $i > /tmp/counter; sleep 0.05; done; exit 7"}},
			Log: "out.log", LogMax: 1 << 20, Accel: string(vmm.DetectAccel()), Host: h, ImageDir: filepath.Join(work, name, "images"),
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitState := func(dir string, done func(State) bool) State {
		t.Helper()
		for {
			st, err := ReadState(dir)
			if err == nil && done(st) {
				return st
			}
			if ctx.Err() != nil {
				t.Fatalf("%s: state %+v, %v", dir, st, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ended := func(dir string) State {
		t.Helper()
		for Alive(dir) {
			if ctx.Err() != nil {
				t.Fatalf("%s still runs", dir)
			}
			time.Sleep(50 * time.Millisecond)
		}
		return waitState(dir, func(State) bool { return true })
	}
	counter := func(dir string) int {
		t.Helper()
		var out bytes.Buffer
		res, err := Exec(ctx, dir, sandbox.ExecSpec{Args: []string{"cat", "/tmp/counter"}}, sandbox.IO{Stdout: &out, Stderr: io.Discard})
		n, _ := strconv.Atoi(strings.TrimSpace(out.String()))
		if err != nil || res.ExitCode != 0 || n < 1 {
			t.Fatalf("exec in %s: %v, counter %q", dir, err, out.String())
		}
		return n
	}

	src := filepath.Join(work, "src", "run-0")
	spec := specOn("src")
	if _, err := Start(src, spec, exe); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = Stop(context.Background(), src, time.Second) }()
	waitState(src, func(s State) bool { return s.Phase == Running })
	for {
		if b, _ := os.ReadFile(filepath.Join(src, "out.log")); bytes.Contains(b, []byte("\n5\n")) || ctx.Err() != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	before := counter(src)

	pair := func() (send, recv *os.File) {
		send, recv, err := vmm.StreamPair()
		if err != nil {
			t.Fatal(err)
		}
		return send, recv
	}
	incoming := func(dir string, spec Spec) *os.File {
		send, recv := pair()
		defer recv.Close() // the target's shim has its own
		if _, err := StartIncoming(dir, spec, exe, recv); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = Stop(context.Background(), dir, time.Second) })
		return send
	}

	t.Run("a target with another machine refuses", func(t *testing.T) {
		dir := filepath.Join(work, "other", "run-0")
		other := specOn("other")
		other.Sandbox.MemoryMiB *= 2
		send := incoming(dir, other)
		defer send.Close()
		if _, err := Migrate(ctx, src, send, MigrateOptions{}); err == nil {
			t.Fatal("migrated to a target whose sandbox has twice the memory")
		}
		if st := ended(dir); st.Reason != "MigrationFailed" || !strings.Contains(st.Message, "256 MiB") {
			t.Errorf("the refusing target's state: %+v", st)
		}
		time.Sleep(300 * time.Millisecond)
		if after := counter(src); after <= before {
			t.Errorf("the source stopped counting: %d, then %d", before, after)
		}
	})

	dst := filepath.Join(work, "dst", "run-0")
	send := incoming(dst, specOn("dst"))
	stats, err := Migrate(ctx, src, send, MigrateOptions{})
	send.Close()
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	t.Logf("migrated: %s, downtime %s, %d MiB", stats.Total, stats.Downtime, stats.Bytes>>20)
	if stats.Bytes < 1<<20 || stats.Total <= 0 {
		t.Errorf("stats: %+v", stats)
	}
	if st := ended(src); st.Phase != Exited || st.Reason != "Migrated" {
		t.Errorf("the source's state after the move: %+v", st)
	}
	if _, err := Exec(ctx, src, sandbox.ExecSpec{Args: []string{"true"}}, sandbox.IO{Stdout: io.Discard, Stderr: io.Discard}); err == nil {
		t.Error("an exec on the source after the move succeeded")
	}
	waitState(dst, func(s State) bool { return s.Phase == Running })
	if n := counter(dst); n < before {
		t.Errorf("the target's counter %d is behind the source's %d", n, before)
	}
	if st := ended(dst); st.ExitCode != 7 || st.Reason != "Error" {
		t.Errorf("the target's state at the end: %+v", st)
	}
	var logs string
	for _, dir := range []string{src, dst} {
		b, err := os.ReadFile(filepath.Join(dir, "out.log"))
		if err != nil {
			t.Fatal(err)
		}
		logs += string(b)
	}
	lines := strings.Fields(logs)
	for i, l := range lines {
		if l != strconv.Itoa(i+1) {
			t.Fatalf("log line %d is %q: %q", i+1, l, logs)
		}
	}
	if len(lines) != 80 {
		t.Errorf("%d numbers across the two logs, want 80", len(lines))
	}
	for _, dir := range []string{src, dst} {
		// The run directories stay (the node agent removes them), the
		// VMs' directories are gone: CheckNoLeaks, at cleanup.
		if _, err := os.Stat(dir); err != nil {
			t.Error(err)
		}
	}
}
