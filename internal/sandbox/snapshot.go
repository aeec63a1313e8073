package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/sparse"
	"hearth.dev/hearth/internal/vmm"
)

// rwDrive is the ID of a sandbox's writable disk among its VM's drives.
const rwDrive = "rw"

// Exec ports of the control sessions around a snapshot. Two: the agent
// reads a session's frames through a buffer, and a snapshot taken just
// after the quiesce session may catch that session before it has closed
// the port, so a session that followed on the same port could lose its
// first frames to it (in the original after Resume, and in every fork).
// Thaw and Restored use a port that is idle when the snapshot is taken.
const (
	quiescePort = protocol.ExecPorts
	resumePort  = protocol.ExecPorts - 1
)

// Files a sandbox snapshot holds besides the VMM's (vmm.Snapshot*).
const (
	snapshotDisk    = "disk.ext4"    // the writable layer
	snapshotSandbox = "sandbox.json" // savedSandbox
)

// savedSandbox is how to start the sandbox again: its VM and its
// workload's Start (which execs inherit).
type savedSandbox struct {
	VM    vmm.Config     `json:"vm"`
	Start protocol.Start `json:"start"`
}

// Control runs a control action (protocol.Control) in the running
// sandbox t over exec port port.
func Control(ctx context.Context, driver vmm.Driver, t Target, port int, st protocol.Start) error {
	st.Args = nil
	res, err := onPort(ctx, driver, t.RunDir, port, st, IO{}, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", st.Control, err)
	}
	if res.Error != "" {
		return fmt.Errorf("%s: %s", st.Control, res.Error)
	}
	return nil
}

// Snapshot saves the running sandbox t (started with Spec.Snapshottable)
// into dir, an empty directory: the guest flushes and freezes its writable
// layer, the VM is paused and saved with that layer's disk, then it runs
// on and the layer thaws. It uses exec ports 2 and 3.
func Snapshot(ctx context.Context, driver vmm.Driver, t Target, dir string) (err error) {
	ctl := func(port int, c protocol.Control) error {
		return Control(ctx, driver, t, port, protocol.Start{Control: c})
	}
	if err := ctl(quiescePort, protocol.Quiesce); err != nil {
		return err
	}
	paused := false
	defer func() {
		if paused {
			err = errors.Join(err, driver.Resume(ctx, t.RunDir))
		}
		err = errors.Join(err, ctl(resumePort, protocol.Thaw))
	}()
	paused = true // Snapshot pauses it even when it fails part way
	cfg, err := driver.Snapshot(ctx, t.RunDir, dir)
	if err != nil {
		return err
	}
	var disk string
	for _, d := range cfg.Drives {
		if d.ID == rwDrive {
			disk = d.Path
		}
	}
	if disk == "" {
		return errors.New("snapshot: the VM has no writable disk")
	}
	if err := sparse.Copy(disk, filepath.Join(dir, snapshotDisk)); err != nil {
		return fmt.Errorf("snapshot the writable disk: %w", err)
	}
	b, err := json.MarshalIndent(savedSandbox{VM: cfg, Start: t.Start}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, snapshotSandbox), b, 0o600)
}

// Forked is a sandbox started from a snapshot.
type Forked struct {
	VM     vmm.VM
	Target Target // for Exec
	// Workload is the host's end of the workload's session, which the
	// fork took over from the sandbox it was saved from: its output
	// frames go on arriving there. Keep reading it; closing it tells the
	// guest agent that its host is gone, and the VM powers off.
	Workload net.Conn
}

// Fork starts a new sandbox from the snapshot in dir, in runDir (an
// empty directory the caller owns, and removes after killing the VM): a
// copy of the snapshot's writable disk, its memory mapped copy-on-write,
// and a new identity: hostname, clock, a reseeded random pool. Its
// workload runs on from where the snapshot caught it.
func Fork(ctx context.Context, driver vmm.Driver, dir, runDir, hostname string) (*Forked, error) {
	var saved savedSandbox
	b, err := os.ReadFile(filepath.Join(dir, snapshotSandbox))
	if err == nil {
		err = json.Unmarshal(b, &saved)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", vmm.ErrBadSnapshot, err)
	}
	cfg := saved.VM
	cfg.ID, cfg.RunDir, cfg.MemoryFile = filepath.Base(runDir), runDir, ""
	cfg.Drives = append([]vmm.Drive(nil), cfg.Drives...)
	for i, d := range cfg.Drives {
		if d.ID == rwDrive {
			cfg.Drives[i].Path = filepath.Join(runDir, snapshotDisk)
			if err := sparse.Copy(filepath.Join(dir, snapshotDisk), cfg.Drives[i].Path); err != nil {
				return nil, fmt.Errorf("%w: writable disk: %v", vmm.ErrBadSnapshot, err)
			}
		}
	}
	vm, err := driver.Restore(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	// The workload's session first, before the guest runs: a guest agent
	// that found no host on it would end the workload and power off.
	conn, err := vm.Channel(ctx)
	if err == nil {
		err = driver.Resume(ctx, runDir)
	}
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		return nil, errors.Join(err, vm.Kill())
	}
	f := &Forked{VM: vm, Target: Target{RunDir: runDir, Start: saved.Start}, Workload: conn}
	f.Target.Start.Hostname = hostname
	entropy := make([]byte, 64)
	if _, err = rand.Read(entropy); err == nil {
		err = Control(ctx, driver, f.Target, resumePort, protocol.Start{Control: protocol.Restored, Hostname: hostname,
			Time: time.Now().UnixNano(), Entropy: entropy})
	}
	if err != nil {
		conn.Close()
		return nil, errors.Join(err, vm.Kill())
	}
	return f, nil
}
