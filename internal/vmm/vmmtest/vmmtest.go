// Package vmmtest is the conformance suite every vmm.Driver must pass: it
// boots hearth's real kernel and agent, speaks the guest protocol over the
// driver's channel, and checks that the VM ends and leaves nothing behind.
package vmmtest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// Run runs the suite against d.
func Run(t *testing.T, d vmm.Driver) {
	testenv.NeedVMs(t)
	agent := filepath.Join(testenv.Binaries(t), "hearth-agent")
	initrd, err := initramfs.Ensure(t.TempDir(), agent)
	if err != nil {
		t.Fatal(err)
	}
	cfg := func(t *testing.T) vmm.Config {
		return vmm.Config{
			ID: "conformance", RunDir: t.TempDir(), Kernel: config.Kernel(), Initrd: initrd,
			VCPUs: 1, MemoryMiB: 128, Accel: vmm.DetectAccel(), Channel: protocol.ChannelName,
		}
	}

	t.Run("handshake and power off", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c := cfg(t)
		vm, err := d.Start(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Kill()
		// The driver's channel carries both ways.
		hello(ctx, t, vm)
		if !strings.Contains(vm.Logs(4096), "host speaks protocol") {
			t.Errorf("the agent's complaint is not in the logs:\n%s", vm.Logs(4096))
		}
		checkGone(t, vm.Pid())
	})

	t.Run("kill", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		vm, err := d.Start(ctx, cfg(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := vm.Kill(); err != nil {
			t.Fatalf("second kill: %v", err)
		}
		if err := vm.Wait(ctx); err == nil || !errors.Is(err, vmm.ErrExited) {
			t.Errorf("wait after kill: %v, want ErrExited", err)
		}
		checkGone(t, vm.Pid())
	})

	t.Run("snapshot and restore", func(t *testing.T) { snapshotRestore(t, d, cfg) })

	if m, ok := d.(vmm.Migrator); ok {
		t.Run("live migration", func(t *testing.T) { liveMigration(t, m, d, cfg) })
	}

	t.Run("bad kernel", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c := cfg(t)
		c.Kernel = filepath.Join(c.RunDir, "no-such-vmlinux")
		vm, err := d.Start(ctx, c)
		if err == nil {
			defer vm.Kill()
			err = vm.Wait(ctx)
		}
		if err == nil || !strings.Contains(err.Error(), "no-such-vmlinux") {
			t.Errorf("got %v, want an error naming the kernel file", err)
		}
	})
}

// hello speaks to the guest agent with the wrong protocol version: it
// answers with its own and powers off, so the VM's Wait returns nil.
func hello(ctx context.Context, t *testing.T, vm vmm.VM) {
	t.Helper()
	conn, err := vm.Channel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	helloOn(ctx, t, vm, conn)
}

// helloOn is hello on the VM's channel conn, which it closes.
func helloOn(ctx context.Context, t *testing.T, vm vmm.VM, conn net.Conn) {
	t.Helper()
	defer conn.Close()
	// A guest that never answers fails the test, not its deadline.
	conn.SetDeadline(time.Now().Add(time.Minute))
	w, r := protocol.NewWriter(conn), protocol.NewReader(conn)
	if err := w.WriteJSON(protocol.THello, 0, protocol.Hello{Version: protocol.Version + 100}); err != nil {
		t.Fatal(err)
	}
	f, err := r.Read()
	if err != nil {
		t.Fatalf("no hello from the guest: %v\n%s", err, vm.Logs(4096))
	}
	var h protocol.Hello
	if f.Type != protocol.THello || protocol.Decode(f, &h) != nil || h.Version != protocol.Version {
		t.Fatalf("guest answered %s %q", f.Type, f.Payload)
	}
	if err := vm.Wait(ctx); err != nil {
		t.Fatalf("wait: %v\n%s", err, vm.Logs(4096))
	}
}

// snapshotRestore snapshots a booted VM, restores two clones of it at
// once from the same files, checks that they run the saved guest, map its
// memory copy-on-write and leave it unchanged, and that broken or
// mismatched snapshots are refused without leaving a VMM behind.
func snapshotRestore(t *testing.T, d vmm.Driver, cfg func(*testing.T) vmm.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := cfg(t)
	c.MemoryFile = filepath.Join(c.RunDir, "memory")
	vm, err := d.Start(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	time.Sleep(time.Second) // let the guest boot some way: the clones go on from wherever it was
	if err := d.Pause(ctx, c.RunDir); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if err := d.Resume(ctx, c.RunDir); err != nil {
		t.Fatalf("resume: %v", err)
	}
	snap := t.TempDir()
	start := time.Now()
	saved, err := d.Snapshot(ctx, c.RunDir, snap)
	if err != nil {
		t.Fatalf("snapshot: %v\n%s", err, vm.Logs(4096))
	}
	if saved.MemoryMiB != c.MemoryMiB || saved.MemoryFile != c.MemoryFile {
		t.Errorf("snapshot returned config %+v, want the VM's", saved)
	}
	t.Logf("snapshot of %d MiB in %s", c.MemoryMiB, time.Since(start).Round(time.Millisecond))
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	sum := func() string {
		b, err := os.ReadFile(filepath.Join(snap, vmm.SnapshotMemory))
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%x", sha256.Sum256(b))
	}
	before := sum()

	clones := make([]vmm.VM, 2)
	for i := range clones {
		cc := cfg(t)
		start := time.Now()
		clone, err := d.Restore(ctx, cc, snap)
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		defer clone.Kill()
		if err := d.Resume(ctx, cc.RunDir); err != nil {
			t.Fatalf("resume clone %d: %v", i, err)
		}
		t.Logf("restore %d in %s", i, time.Since(start).Round(time.Millisecond))
		clones[i] = clone
		maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", clone.Pid()))
		if !strings.Contains(string(maps), filepath.Join(snap, vmm.SnapshotMemory)) {
			t.Errorf("clone %d does not map the snapshot's memory file", i)
		}
	}
	for _, clone := range clones {
		hello(ctx, t, clone)
		checkGone(t, clone.Pid())
	}
	if sum() != before {
		t.Error("the clones changed the snapshot's memory file")
	}

	t.Run("mismatched machine", func(t *testing.T) {
		cc := cfg(t)
		cc.MemoryMiB *= 2
		_, err := d.Restore(ctx, cc, snap)
		if !errors.Is(err, vmm.ErrBadSnapshot) || !strings.Contains(err.Error(), "MiB") {
			t.Errorf("restore with twice the memory: %v, want ErrBadSnapshot naming the memory size", err)
		}
	})
	t.Run("truncated state", func(t *testing.T) {
		bad := t.TempDir()
		for _, f := range []string{vmm.SnapshotMemory, vmm.SnapshotInfo, vmm.SnapshotState} {
			b, err := os.ReadFile(filepath.Join(snap, f))
			if err != nil {
				t.Fatal(err)
			}
			if f == vmm.SnapshotState {
				b = b[:len(b)/2]
			}
			if err := os.WriteFile(filepath.Join(bad, f), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		cc := cfg(t)
		vm, err := d.Restore(ctx, cc, bad)
		if err == nil {
			vm.Kill()
		}
		if !errors.Is(err, vmm.ErrBadSnapshot) {
			t.Errorf("restore of a truncated state: %v, want ErrBadSnapshot", err)
		}
		if pids := vmm.Pids(cc.RunDir); len(pids) > 0 {
			t.Errorf("VMM processes %v left after a failed restore", pids)
		}
	})
	t.Run("missing files", func(t *testing.T) {
		if _, err := d.Restore(ctx, cfg(t), t.TempDir()); !errors.Is(err, vmm.ErrBadSnapshot) {
			t.Errorf("restore of an empty directory: %v, want ErrBadSnapshot", err)
		}
	})
}

func checkGone(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, 0); err == nil {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); !strings.Contains(string(b), ") Z") {
			t.Errorf("VMM process %d still running", pid)
		}
	}
}
