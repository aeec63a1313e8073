package vmmtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"hearth.dev/hearth/internal/vmm"
)

// socketPair is vmm.StreamPair, closed after t.
func socketPair(t *testing.T) (send, recv *os.File) {
	t.Helper()
	send, recv, err := vmm.StreamPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { send.Close(); recv.Close() })
	return send, recv
}

// liveMigration moves a running guest with a writable drive into a
// second VMM and checks that the guest goes on there (its agent answers
// on the new VMM's channel), that the drive's blocks came with it, and
// that a migration whose target dies, or that cannot converge in time,
// leaves the source running.
func liveMigration(t *testing.T, m vmm.Migrator, d vmm.Driver, cfg func(*testing.T) vmm.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const diskSize = 4 << 20
	// Guest RAM is anonymous: no MemoryFile (vmm.Migrator.Incoming
	// says why).
	withDisk := func(t *testing.T, contents []byte) vmm.Config {
		c := cfg(t)
		disk := filepath.Join(c.RunDir, "disk")
		if err := os.WriteFile(disk, contents, 0o600); err != nil {
			t.Fatal(err)
		}
		c.Drives = []vmm.Drive{{ID: "disk", Path: disk, Serial: "disk"}}
		return c
	}
	data := make([]byte, diskSize)
	rand.Read(data[:diskSize/2]) // the rest stays zero: zero blocks
	src := withDisk(t, data)
	vm, err := d.Start(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	time.Sleep(time.Second) // let the guest boot some way

	t.Run("target dies mid-copy", func(t *testing.T) {
		send, recv := socketPair(t)
		in, err := m.Incoming(ctx, withDisk(t, make([]byte, diskSize)), recv)
		if err != nil {
			t.Fatal(err)
		}
		recv.Close()
		go func() { time.Sleep(100 * time.Millisecond); in.Kill() }()
		_, err = m.MigrateOut(ctx, src.RunDir, send, vmm.MigrateOptions{Bandwidth: 8 << 20})
		if err == nil {
			t.Fatal("the migration succeeded with its target killed")
		}
		t.Logf("migration to a killed target: %v", err)
		checkGone(t, in.Pid())
	})

	t.Run("does not converge in time", func(t *testing.T) {
		send, recv := socketPair(t)
		in, err := m.Incoming(ctx, withDisk(t, make([]byte, diskSize)), recv)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Kill()
		recv.Close()
		_, err = m.MigrateOut(ctx, src.RunDir, send, vmm.MigrateOptions{Bandwidth: 1 << 20, Timeout: 2 * time.Second})
		if !errors.Is(err, vmm.ErrNoConvergence) {
			t.Fatalf("a migration at 1 MiB/s of a 128 MiB guest in 2 s: %v, want ErrNoConvergence", err)
		}
		t.Logf("%v", err)
		// The target's stream broke off: it ends itself.
		wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
		defer wcancel()
		if err := in.Wait(wctx); errors.Is(err, context.DeadlineExceeded) {
			t.Error("the target of an abandoned migration still runs")
		}
	})

	// The source still runs after both failures: the real migration
	// below needs it running and fails otherwise.
	dst := withDisk(t, make([]byte, diskSize))
	send, recv := socketPair(t)
	in, err := m.Incoming(ctx, dst, recv)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Kill()
	recv.Close()
	// The guest's channel is connected on the target before the stream
	// loads: the port's host side is then connected on both sides, and
	// the guest sees no hang-up (its agent would take one for its host's
	// end).
	conn, err := in.Channel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	switched := false
	stats, err := m.MigrateOut(ctx, src.RunDir, send, vmm.MigrateOptions{
		BeforeSwitch: func(context.Context) error { switched = true; return nil }})
	if err != nil {
		t.Fatalf("migrate: %v\nsource:\n%s\ntarget:\n%s", err, vm.Logs(4096), in.Logs(4096))
	}
	if !switched {
		t.Error("BeforeSwitch did not run")
	}
	t.Logf("migrated in %s: downtime %s, %d MiB, %d rounds", stats.Total, stats.Downtime, stats.Bytes>>20, stats.Rounds)
	if stats.Bytes == 0 || stats.Rounds == 0 {
		t.Errorf("stats %+v: no bytes or rounds", stats)
	}
	if err := in.Accept(ctx); err != nil {
		t.Fatalf("accept: %v", err)
	}
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(src.Drives[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst.Drives[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || !bytes.Equal(got[:diskSize/2], data[:diskSize/2]) {
		t.Error("the target's drive does not hold the source's blocks")
	}
	if err := in.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	helloOn(ctx, t, in, conn)
	checkGone(t, in.Pid())
}
