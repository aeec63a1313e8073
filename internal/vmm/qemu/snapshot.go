package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

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
	in := info{QEMU: qemuVersion, Accel: cfg.Accel, Kernel: cfg.Kernel, MemoryMiB: cfg.MemoryMiB, VCPUs: max(cfg.VCPUs, 1)}
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

// Pause stops the vCPUs.
func (v *VM) Pause(context.Context) error { return v.qmp("stop", nil, nil) }

// Resume runs them again.
func (v *VM) Resume(context.Context) error { return v.qmp("cont", nil, nil) }

// Snapshot pauses the VM and saves it into dir: the device state through
// QEMU's migration stream (written by QEMU to a file descriptor hearth
// passes it: QEMU runs sandboxed, unable to open files or spawn), the
// memory as a copy of the VM's memory file, and snapshot.json.
func (v *VM) Snapshot(ctx context.Context, dir string) (err error) {
	if v.cfg.MemoryFile == "" {
		return errors.New("snapshot: the VM was started without a memory file")
	}
	version, err := v.version()
	if err != nil {
		return err
	}
	state, err := os.OpenFile(filepath.Join(dir, vmm.SnapshotState), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer func() {
		state.Close()
		if err != nil {
			for _, f := range []string{vmm.SnapshotState, vmm.SnapshotMemory, vmm.SnapshotInfo} {
				os.Remove(filepath.Join(dir, f))
			}
		}
	}()
	if err := v.Pause(ctx); err != nil {
		return err
	}
	if err := v.ignoreShared(); err != nil {
		return err
	}
	if err := v.qmpFile("getfd", map[string]string{"fdname": "snapshot"}, nil, state); err != nil {
		return err
	}
	if err := v.qmp("migrate", map[string]string{"uri": "fd:snapshot"}, nil); err != nil {
		return err
	}
	if err := v.waitMigration(ctx, "completed"); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := state.Sync(); err != nil {
		return err
	}
	if err := copyFile(v.cfg.MemoryFile, filepath.Join(dir, vmm.SnapshotMemory)); err != nil {
		return fmt.Errorf("snapshot memory: %w", err)
	}
	in := infoOf(v.cfg, version)
	in.Created = time.Now().UTC()
	b, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, vmm.SnapshotInfo), b, 0o600)
}

// ignoreShared leaves shared RAM (the memory file) out of the migration
// stream: it is saved, or mapped, as the file itself.
func (v *VM) ignoreShared() error {
	return v.qmp("migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}, nil)
}

// waitMigration polls the migration until it reaches want, or fails.
func (v *VM) waitMigration(ctx context.Context, want string) error {
	for {
		var st struct {
			Status      string `json:"status"`
			ErrorString string `json:"error-desc"`
		}
		if err := v.qmp("query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case want:
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorString)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-v.done:
			return fmt.Errorf("%w during migration: %v", vmm.ErrExited, v.waitErr)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func (v *VM) version() (string, error) {
	var ver struct {
		QEMU struct {
			Major, Minor, Micro int
		} `json:"qemu"`
		Package string `json:"package"`
	}
	if err := v.qmp("query-version", nil, &ver); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d.%d.%d %s", ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro, ver.Package), nil
}

// Restore starts QEMU waiting for an incoming migration, with guest RAM
// mapped privately from the snapshot's memory file, and feeds it the
// saved device state. A snapshot that is incomplete, corrupt or of
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
	vm, err := d.launch(ctx, cfg, append(args(cfg, memFile, false), "-incoming", "defer"))
	if err != nil {
		return nil, err
	}
	version, err := vm.version()
	if err != nil {
		return nil, vm.fail(err)
	}
	if why := saved.mismatch(infoOf(cfg, version)); why != "" {
		return nil, errors.Join(fmt.Errorf("%w: %s", vmm.ErrBadSnapshot, why), vm.Kill())
	}
	if err := vm.ignoreShared(); err != nil {
		return nil, vm.fail(err)
	}
	if err := vm.qmpFile("getfd", map[string]string{"fdname": "snapshot"}, nil, state); err != nil {
		return nil, vm.fail(err)
	}
	if err := vm.qmp("migrate-incoming", map[string]string{"uri": "fd:snapshot"}, nil); err != nil {
		return nil, vm.fail(err)
	}
	// QEMU ends itself if the stream does not load. The guest was paused
	// when it was saved, so it stays paused once loaded: run it.
	if err := vm.waitMigration(ctx, "completed"); err != nil {
		select {
		case <-vm.done:
			err = fmt.Errorf("%w: QEMU could not load it", vmm.ErrBadSnapshot)
		case <-time.After(time.Second):
		}
		return nil, vm.fail(err)
	}
	if err := vm.Resume(ctx); err != nil {
		return nil, vm.fail(err)
	}
	return vm, nil
}

// copyFile copies src to a new file dst (the kernel copies, in-kernel).
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
