package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
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

// Exec ports of the control sessions around a snapshot. Two: a snapshot
// taken just after the quiesce session may catch that session before the
// agent has finished it, and it then ends on its port in the original
// after Resume and in every fork; Thaw and Restored use a port that is
// idle when the snapshot is taken. MainPort runs a forked sandbox's own
// command (RunSnapshot). Execs use the ports below them (UserExecPorts).
const (
	quiescePort   = protocol.ExecPorts
	resumePort    = protocol.ExecPorts - 1
	MainPort      = protocol.ExecPorts - 2
	UserExecPorts = protocol.ExecPorts - 3
)

// Files a sandbox snapshot holds besides the VMM's (vmm.Snapshot*).
const (
	snapshotDisk    = "disk.ext4"    // the writable layer
	snapshotSandbox = "sandbox.json" // savedSandbox
)

// Saved is a sandbox snapshot's sandbox.json: how to start the sandbox
// again.
type Saved struct {
	// Memory: the VM's memory and devices are saved, and a sandbox
	// started from the snapshot runs on from where it was (Fork). Without
	// it the snapshot holds the writable disk alone (SnapshotDisk).
	Memory bool `json:"memory"`
	// Protocol is the guest agent's protocol version in the saved VM.
	Protocol int        `json:"protocol"`
	VM       vmm.Config `json:"vm"`
	// Start is the workload's, which execs inherit.
	Start  protocol.Start `json:"start"`
	Image  string         `json:"image,omitempty"`
	Digest string         `json:"digest,omitempty"`
}

// ReadSaved reads the snapshot in dir.
func ReadSaved(dir string) (*Saved, error) {
	var saved Saved
	b, err := os.ReadFile(filepath.Join(dir, snapshotSandbox))
	if err == nil {
		err = json.Unmarshal(b, &saved)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", vmm.ErrBadSnapshot, err)
	}
	if saved.Protocol != protocol.Version {
		return nil, fmt.Errorf("%w: it was made with guest agent protocol %d, this hearth speaks %d", vmm.ErrBadSnapshot, saved.Protocol, protocol.Version)
	}
	return &saved, nil
}

// RestoreConfig is the configuration of a VM restored from the snapshot
// in dir to run in runDir: the saved machine, with a copy of the saved
// writable layer in runDir.
func (saved *Saved) RestoreConfig(dir, runDir string) (vmm.Config, error) {
	cfg := saved.VM
	cfg.ID, cfg.RunDir, cfg.MemoryFile = filepath.Base(runDir), runDir, ""
	cfg.Drives = append([]vmm.Drive(nil), cfg.Drives...)
	for i, d := range cfg.Drives {
		if d.ID == rwDrive {
			cfg.Drives[i].Path = filepath.Join(runDir, snapshotDisk)
			if err := sparse.Copy(DiskPath(dir), cfg.Drives[i].Path); err != nil {
				return vmm.Config{}, fmt.Errorf("%w: writable disk: %v", vmm.ErrBadSnapshot, err)
			}
		}
	}
	return cfg, nil
}

// DiskPath is the writable layer saved in the snapshot dir.
func DiskPath(dir string) string { return filepath.Join(dir, snapshotDisk) }

func writeSaved(dir string, saved Saved) error {
	saved.Protocol = protocol.Version
	b, err := json.MarshalIndent(saved, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, snapshotSandbox), b, 0o600)
}

// controlTimeout bounds a control action: a guest that answers Hello and
// then stays silent would otherwise hold its caller (the snapshot
// controller, and its lock) forever. Quiesce flushes the writable layer,
// which may take a while with much dirty data.
var controlTimeout = 2 * time.Minute

// Control runs a control action (protocol.Control) in the running
// sandbox t over exec port port, within controlTimeout.
func Control(ctx context.Context, driver vmm.Driver, t Target, port int, st protocol.Start) error {
	st.Args = nil
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	res, err := onPort(cctx, driver, t.RunDir, port, st, IO{}, nil)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w: the guest did not finish it within %s", st.Control, ErrGuestProtocol, controlTimeout)
	}
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
	if err := sparse.Copy(disk, DiskPath(dir)); err != nil {
		return fmt.Errorf("snapshot the writable disk: %w", err)
	}
	return writeSaved(dir, Saved{Memory: true, VM: cfg, Start: t.Start, Image: t.Image, Digest: t.Digest})
}

// SnapshotDisk saves the writable layer of the running sandbox t into
// dir, an empty directory: the guest flushes and freezes it while it is
// copied. A sandbox started with Spec.DiskFrom set to DiskPath(dir) boots
// with those files.
func SnapshotDisk(ctx context.Context, driver vmm.Driver, t Target, dir string) (err error) {
	ctl := func(port int, c protocol.Control) error {
		return Control(ctx, driver, t, port, protocol.Start{Control: c})
	}
	if err := ctl(quiescePort, protocol.Quiesce); err != nil {
		return err
	}
	defer func() { err = errors.Join(err, ctl(resumePort, protocol.Thaw)) }()
	// Run and Fork both keep the writable layer here.
	if err := sparse.Copy(filepath.Join(t.RunDir, snapshotDisk), DiskPath(dir)); err != nil {
		return fmt.Errorf("snapshot the writable disk: %w", err)
	}
	return writeSaved(dir, Saved{Start: t.Start, Image: t.Image, Digest: t.Digest})
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

// Nic is a fork's network interface: its tap and the guest's
// configuration (none: connected to nothing, and eth0 left as saved).
type Nic struct {
	Tap     string
	Network *protocol.Network
}

// Fork starts a new sandbox from the snapshot in dir, in runDir (an
// empty directory the caller owns, and removes after killing the VM): a
// copy of the snapshot's writable disk, its memory mapped copy-on-write,
// and a new identity: hostname, clock, a reseeded random pool. Its
// workload runs on from where the snapshot caught it.
func Fork(ctx context.Context, driver vmm.Driver, dir, runDir, hostname string, nic Nic) (*Forked, error) {
	saved, err := ReadSaved(dir)
	if err != nil {
		return nil, err
	}
	if !saved.Memory {
		return nil, fmt.Errorf("%w: it holds a disk alone: boot a sandbox with it instead", vmm.ErrBadSnapshot)
	}
	cfg, err := saved.RestoreConfig(dir, runDir)
	if err != nil {
		return nil, err
	}
	cfg.Net.Tap = nic.Tap
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
	f := &Forked{VM: vm, Target: Target{RunDir: runDir, Start: saved.Start, Image: saved.Image, Digest: saved.Digest}, Workload: conn}
	f.Target.Start.Hostname, f.Target.Start.Network = hostname, nic.Network
	entropy := make([]byte, 64)
	if _, err = rand.Read(entropy); err == nil {
		err = Control(ctx, driver, f.Target, resumePort, protocol.Start{Control: protocol.Restored, Hostname: hostname,
			Time: time.Now().UnixNano(), Entropy: entropy, Network: nic.Network})
	}
	if err != nil {
		conn.Close()
		return nil, errors.Join(err, vm.Kill())
	}
	return f, nil
}

// RunSnapshot starts a sandbox from the snapshot in dir (a Fork) and runs
// it to its end, as Run does a booted one. With spec.Entrypoint or
// spec.Command set, that command is the workload: it runs over MainPort
// in the environment of the snapshot's workload (with spec's Env,
// WorkingDir and User over it), and the snapshot's own process runs on
// beside it, its output dropped. Without, the snapshot's workload runs on
// and its end is the sandbox's.
func (rt *Runtime) RunSnapshot(ctx context.Context, dir string, spec Spec, sio IO) (res *Result, err error) {
	log := rt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	saved, err := ReadSaved(dir)
	if err != nil {
		return nil, err
	}
	if saved.Digest != "" && rt.Images != nil {
		// The snapshot's VM reads the image's root filesystem: keep it.
		release, err := rt.Images.Use(saved.Digest)
		if err != nil {
			return nil, fmt.Errorf("%w: its image %s: %v", vmm.ErrBadSnapshot, saved.Image, err)
		}
		defer release()
	}
	rt.sweep(log)
	id := newID()
	runDir, remove, err := rt.makeRunDir(id)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, remove()) }()
	name := spec.Name
	if name == "" {
		name = "hearth-" + id
	}
	start := time.Now()
	f, err := Fork(ctx, rt.Driver, dir, runDir, name, Nic{Tap: spec.Tap, Network: spec.Network})
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, f.VM.Kill()) }()
	// Its RAM is a private mapping of the snapshot's memory file: only
	// the disk copy (Fork makes it) is its own to reserve. A fork that
	// does not fit ends here.
	if err := rt.reserve(filepath.Join(runDir, snapshotDisk), "", 0); err != nil {
		f.Workload.Close()
		return nil, err
	}
	log.Debug("forked", "snapshot", dir, "id", id, "took", time.Since(start))
	if target := sio.Target; target != nil {
		sio.Target = func(t Target) {
			t.Image, t.Digest = saved.Image, saved.Digest
			target(t)
		}
	}
	if spec.WarmUp {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := Exec(wctx, rt.Driver, f.Target, MainPort, ExecSpec{Args: []string{"true"}}, IO{Stdout: io.Discard, Stderr: io.Discard}, log)
		cancel()
		if err != nil {
			log.Warn("warm-up exec", "err", err)
		}
	}
	if len(spec.Entrypoint) == 0 && len(spec.Command) == 0 {
		s := &session{vm: f.VM, runDir: runDir, sio: sio, start: start, log: log}
		return s.resume(ctx, f.Workload, f.Target.Start)
	}
	// A guest whose port is not read blocks on its writes: read the
	// snapshot's workload's frames and drop them.
	defer f.Workload.Close()
	go func() {
		r := protocol.NewReader(f.Workload)
		for {
			if _, err := r.Read(); err != nil {
				return
			}
		}
	}()
	if sio.Target != nil {
		sio.Target(f.Target)
	}
	var boot time.Duration
	eio := sio
	eio.Target, eio.Started = nil, func() {
		boot = time.Since(start)
		if sio.Started != nil {
			sio.Started()
		}
	}
	res, err = Exec(ctx, rt.Driver, f.Target, MainPort, ExecSpec{
		Args: append(append([]string(nil), spec.Entrypoint...), spec.Command...),
		Env:  spec.Env, WorkingDir: spec.WorkingDir, User: spec.User,
		TTY: spec.TTY, Stdin: spec.Stdin, Rows: spec.Rows, Cols: spec.Cols,
	}, eio, log)
	if err != nil {
		return nil, err
	}
	res.Boot = boot
	return res, nil
}
