package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/sparse"
	"hearth.dev/hearth/internal/vmm"
)

// Running is a sandbox whose workload runs, as the process that owns its
// VM holds it (Run's, RunSnapshot's or Fork's caller: the shim): exec,
// controls and snapshots go over the VM's one channel, as sessions beside
// the workload's. It is safe for concurrent use, and its methods fail
// once the sandbox has ended.
type Running struct {
	ch     *channel
	driver vmm.Driver
	// vm and cfg are the VM and how it was started, where this process
	// booted it (Run; for a migration), and zero otherwise.
	vm     vmm.VM
	cfg    vmm.Config
	runDir string
	// boot is the workload's, whose process an exec inherits (its
	// environment, user and directory, as `docker exec` does).
	boot          protocol.Boot
	image, digest string
	log           *slog.Logger
	snap          sync.Mutex // one snapshot at a time
}

// Close ends the sandbox's channel (the guest agent powers off when its
// host goes); its owner kills the VM.
func (r *Running) Close() { r.ch.close() }

// Err is why the sandbox's channel ended (its VM ended, or its guest
// broke the protocol); nil while it runs.
func (r *Running) Err() error { return r.ch.Err() }

// ExecSpec is one more process in a running sandbox.
type ExecSpec struct {
	Args       []string `json:"args"`
	Env        []string `json:"env,omitempty"` // KEY=VALUE, over the workload's
	WorkingDir string   `json:"workingDir,omitempty"`
	User       string   `json:"user,omitempty"`
	TTY        bool     `json:"tty,omitempty"`
	Stdin      bool     `json:"stdin,omitempty"`
	Rows       uint16   `json:"rows,omitempty"`
	Cols       uint16   `json:"cols,omitempty"`
}

// execStartLimit bounds the wait for an exec's process to start.
const execStartLimit = 30 * time.Second

// Exec runs spec in the sandbox and returns how it ended. The sandbox is
// not affected by its exit; any number run at once (up to
// protocol.MaxSessions sessions).
func (r *Running) Exec(ctx context.Context, spec ExecSpec, sio IO) (*Result, error) {
	if len(spec.Args) == 0 {
		return nil, errors.New("exec: no command given")
	}
	p := r.boot.Process
	p.Args = spec.Args
	p.Env = mergeEnv(p.Env, spec.Env)
	p.Dir = firstNonEmpty(spec.WorkingDir, p.Dir)
	p.User = firstNonEmpty(spec.User, p.User)
	p.TTY, p.Stdin, p.Rows, p.Cols = spec.TTY, spec.Stdin, spec.Rows, spec.Cols
	st, err := r.ch.open(protocol.TExec, p, sinks{sio.Stdout, sio.Stderr})
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	s := &session{st: st, proc: p, sio: sio, start: time.Now(), log: r.log}
	return s.serve(ctx, execStartLimit)
}

// controlTimeout bounds a control action: a guest that answers and then
// stays silent would otherwise hold its caller (a snapshot, and its lock)
// forever. Quiesce flushes the writable layer, which may take a while
// with much dirty data.
var controlTimeout = 2 * time.Minute

// Control carries out a control action in the sandbox, within
// controlTimeout.
func (r *Running) Control(ctx context.Context, c protocol.Control) error {
	st, err := r.ch.open(protocol.TControl, c, sinks{})
	if err != nil {
		return fmt.Errorf("%s: %w", c.Action, err)
	}
	t := time.NewTimer(controlTimeout)
	defer t.Stop()
	select {
	case <-st.ended:
	case <-ctx.Done():
		st.close()
		return fmt.Errorf("%s: %w", c.Action, ctx.Err())
	case <-t.C:
		st.close()
		return fmt.Errorf("%s: %w: the guest did not finish it within %s", c.Action, ErrGuestProtocol, controlTimeout)
	}
	e, err := st.result()
	if err != nil {
		return fmt.Errorf("%s: %w", c.Action, err)
	}
	if e.Error != "" {
		return fmt.Errorf("%s: %s", c.Action, e.Error)
	}
	return nil
}

func (r *Running) act(ctx context.Context, a protocol.Action) error {
	return r.Control(ctx, protocol.Control{Action: a})
}

// Snapshot saves the sandbox (started with Spec.Snapshottable) into dir,
// an empty directory: the guest flushes and freezes its writable layer,
// the VM is paused and saved with that layer's disk, then it runs on and
// the layer thaws.
func (r *Running) Snapshot(ctx context.Context, dir string) (err error) {
	r.snap.Lock()
	defer r.snap.Unlock()
	if err := r.act(ctx, protocol.Quiesce); err != nil {
		return err
	}
	paused := false
	defer func() {
		if paused {
			err = errors.Join(err, r.driver.Resume(ctx, r.runDir))
		}
		err = errors.Join(err, r.act(ctx, protocol.Thaw))
	}()
	paused = true // Snapshot pauses it even when it fails part way
	cfg, err := r.driver.Snapshot(ctx, r.runDir, dir)
	if err != nil {
		return err
	}
	// The guest is paused: every session opened from here on is one the
	// saved guest never heard of.
	next := r.ch.nextID()
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
	return writeSaved(dir, Saved{Memory: true, VM: cfg, Boot: r.boot, Image: r.image, Digest: r.digest, NextSession: next})
}

// SnapshotDisk saves the sandbox's writable layer into dir, an empty
// directory: the guest flushes and freezes it while it is copied. A
// sandbox started with Spec.DiskFrom set to DiskPath(dir) boots with
// those files.
func (r *Running) SnapshotDisk(ctx context.Context, dir string) (err error) {
	r.snap.Lock()
	defer r.snap.Unlock()
	if err := r.act(ctx, protocol.Quiesce); err != nil {
		return err
	}
	defer func() { err = errors.Join(err, r.act(ctx, protocol.Thaw)) }()
	// Run and Fork both keep the writable layer here.
	if err := sparse.Copy(filepath.Join(r.runDir, snapshotDisk), DiskPath(dir)); err != nil {
		return fmt.Errorf("snapshot the writable disk: %w", err)
	}
	return writeSaved(dir, Saved{Boot: r.boot, Image: r.image, Digest: r.digest})
}
