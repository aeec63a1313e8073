// Package vmmtest is the conformance suite every vmm.Driver must pass: it
// boots hearth's real kernel and agent, speaks the guest protocol over the
// driver's channel, and checks that the VM ends and leaves nothing behind.
package vmmtest

import (
	"context"
	"errors"
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
			VCPUs: 1, MemoryMiB: 128, Accel: vmm.DetectAccel(),
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
		conn, err := vm.Channel(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		w, r := protocol.NewWriter(conn), protocol.NewReader(conn)
		// An agent of another protocol version answers with its own
		// version and powers off: the driver's channel carries both ways.
		if err := w.WriteJSON(protocol.THello, protocol.Hello{Version: protocol.Version + 100}); err != nil {
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
			t.Fatalf("wait: %v", err)
		}
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

func checkGone(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, 0); err == nil {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); !strings.Contains(string(b), ") Z") {
			t.Errorf("VMM process %d still running", pid)
		}
	}
}
