package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"hearth.dev/hearth/internal/sparse"
	"hearth.dev/hearth/internal/vmm"
)

// info is a snapshot's snapshot.json: what the saved machine was, so that
// a restore into another one is refused with the reason instead of
// failing inside QEMU.
type info struct {
	QEMU      string    `json:"qemu"`
	Accel     vmm.Accel `json:"accel"`
	Kernel    string    `json:"kernel"`
	MemoryMiB int       `json:"memoryMiB"`
	VCPUs     int       `json:"vcpus"`
	Drives    []string  `json:"drives"`
	Created   time.Time `json:"created"`
}

func infoOf(cfg vmm.Config, qemuVersion string) info {
	// The kernel by path, size and time: one rebuilt in place is another
	// kernel, whose memory layout the saved one does not share.
	kernel := cfg.Kernel
	if fi, err := os.Stat(cfg.Kernel); err == nil {
		kernel = fmt.Sprintf("%s (%d bytes, %s)", cfg.Kernel, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano))
	}
	in := info{QEMU: qemuVersion, Accel: cfg.Accel, Kernel: kernel, MemoryMiB: cfg.MemoryMiB, VCPUs: max(cfg.VCPUs, 1)}
	for _, d := range cfg.Drives {
		in.Drives = append(in.Drives, d.ID)
	}
	return in
}

// mismatch says how b differs from the saved machine a, or "".
func (a info) mismatch(b info) string {
	switch {
	case a.QEMU != b.QEMU:
		return fmt.Sprintf("it was made by QEMU %s, this is QEMU %s", a.QEMU, b.QEMU)
	case a.Accel != b.Accel:
		return fmt.Sprintf("it was made under %s, this VM would run under %s", a.Accel, b.Accel)
	case a.Kernel != b.Kernel:
		return fmt.Sprintf("it was made with kernel %s, not %s", a.Kernel, b.Kernel)
	case a.MemoryMiB != b.MemoryMiB || a.VCPUs != b.VCPUs:
		return fmt.Sprintf("it has %d MiB and %d vCPUs, not %d MiB and %d", a.MemoryMiB, a.VCPUs, b.MemoryMiB, b.VCPUs)
	case !slices.Equal(a.Drives, b.Drives):
		return fmt.Sprintf("it has drives %v, not %v", a.Drives, b.Drives)
	}
	return ""
}

// startedWith is the configuration the VM in runDir was started with.
func startedWith(runDir string) (vmm.Config, error) {
	var cfg vmm.Config
	b, err := os.ReadFile(filepath.Join(runDir, vmFile))
	if err != nil {
		return cfg, fmt.Errorf("no VM in %s: %w", runDir, err)
	}
	return cfg, json.Unmarshal(b, &cfg)
}

// control connects to the control monitor of the VM in runDir and runs f.
func control(runDir string, f func(*monitor) error) error {
	m, err := dialMonitor(sock(runDir, controlSock))
	if err != nil {
		return fmt.Errorf("connect to the VM in %s: %w", runDir, err)
	}
	defer m.Disconnect()
	return f(m)
}

// Pause stops the vCPUs of the VM in runDir.
func (d *Driver) Pause(_ context.Context, runDir string) error {
	return control(runDir, func(m *monitor) error { return m.qmp("stop", nil, nil) })
}

// Resume runs them again.
func (d *Driver) Resume(_ context.Context, runDir string) error {
	return control(runDir, func(m *monitor) error { return m.qmp("cont", nil, nil) })
}

// Snapshot pauses the VM in runDir and saves it into dir: the device
// state through QEMU's migration stream (written by QEMU to a file
// descriptor hearth passes it: QEMU runs sandboxed, unable to open files
// or spawn), the memory as a copy of the VM's memory file, and
// snapshot.json. It returns the configuration the VM was started with.
func (d *Driver) Snapshot(ctx context.Context, runDir, dir string) (cfg vmm.Config, err error) {
	if cfg, err = startedWith(runDir); err != nil {
		return cfg, fmt.Errorf("snapshot: %w", err)
	}
	if cfg.MemoryFile == "" {
		return cfg, errors.New("snapshot: the VM was started without a memory file")
	}
	state, err := os.OpenFile(filepath.Join(dir, vmm.SnapshotState), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return cfg, fmt.Errorf("snapshot: %w", err)
	}
	defer func() {
		state.Close()
		if err != nil {
			for _, f := range []string{vmm.SnapshotState, vmm.SnapshotMemory, vmm.SnapshotInfo} {
				os.Remove(filepath.Join(dir, f))
			}
		}
	}()
	var version string
	err = control(runDir, func(m *monitor) error {
		if version, err = m.version(); err != nil {
			return err
		}
		if err := m.qmp("stop", nil, nil); err != nil {
			return err
		}
		if err := m.ignoreShared(); err != nil {
			return err
		}
		if err := m.qmpFile("getfd", map[string]string{"fdname": "snapshot"}, nil, state); err != nil {
			return err
		}
		if err := m.qmp("migrate", map[string]string{"uri": "fd:snapshot"}, nil); err != nil {
			return err
		}
		return m.waitMigration(ctx, "completed")
	})
	if err != nil {
		return cfg, fmt.Errorf("snapshot: %w", err)
	}
	if err := state.Sync(); err != nil {
		return cfg, err
	}
	if err := sparse.Copy(cfg.MemoryFile, filepath.Join(dir, vmm.SnapshotMemory)); err != nil {
		return cfg, fmt.Errorf("snapshot memory: %w", err)
	}
	in := infoOf(cfg, version)
	in.Created = time.Now().UTC()
	b, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return cfg, err
	}
	return cfg, os.WriteFile(filepath.Join(dir, vmm.SnapshotInfo), b, 0o600)
}

// Restore starts QEMU waiting for an incoming migration, with guest RAM
// mapped privately from the snapshot's memory file, and feeds it the
// saved device state; the VM is left paused. A snapshot that is incomplete, corrupt or of
// another machine is refused with vmm.ErrBadSnapshot and leaves no QEMU
// behind.
func (d *Driver) Restore(ctx context.Context, cfg vmm.Config, dir string) (vmm.VM, error) {
	b, err := os.ReadFile(filepath.Join(dir, vmm.SnapshotInfo))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", vmm.ErrBadSnapshot, err)
	}
	var saved info
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", vmm.ErrBadSnapshot, vmm.SnapshotInfo, err)
	}
	memFile := filepath.Join(dir, vmm.SnapshotMemory)
	if fi, err := os.Stat(memFile); err != nil || fi.Size() != int64(saved.MemoryMiB)<<20 {
		return nil, fmt.Errorf("%w: the memory file is missing or not %d MiB", vmm.ErrBadSnapshot, saved.MemoryMiB)
	}
	state, err := os.Open(filepath.Join(dir, vmm.SnapshotState))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", vmm.ErrBadSnapshot, err)
	}
	defer state.Close()

	if why := saved.mismatch(infoOf(cfg, saved.QEMU)); why != "" {
		return nil, fmt.Errorf("%w: %s", vmm.ErrBadSnapshot, why)
	}
	vm, err := d.launch(ctx, cfg, memFile, false, "-incoming", "defer")
	if err != nil {
		return nil, err
	}
	version, err := vm.mon.version()
	if err != nil {
		return nil, vm.fail(err)
	}
	if why := saved.mismatch(infoOf(cfg, version)); why != "" {
		return nil, errors.Join(fmt.Errorf("%w: %s", vmm.ErrBadSnapshot, why), vm.Kill())
	}
	if err := vm.mon.ignoreShared(); err != nil {
		return nil, vm.fail(err)
	}
	if err := vm.mon.qmpFile("getfd", map[string]string{"fdname": "snapshot"}, nil, state); err != nil {
		return nil, vm.fail(err)
	}
	if err := vm.mon.qmp("migrate-incoming", map[string]string{"uri": "fd:snapshot"}, nil); err != nil {
		return nil, vm.fail(err)
	}
	// QEMU ends itself if the stream does not load. The guest was paused
	// when it was saved, so it stays paused once loaded, until Resume.
	if exited, err := vm.awaitIncoming(ctx); err != nil {
		if exited {
			err = fmt.Errorf("%w: QEMU could not load it", vmm.ErrBadSnapshot)
		}
		return nil, vm.fail(err)
	}
	return vm, nil
}
