package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/sparse"
	"hearth.dev/hearth/internal/vmm"
)

// rwDrive is the ID of a sandbox's writable disk among its VM's drives.
const rwDrive = "rw"

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
	// Boot is the workload's, whose process execs inherit.
	Boot   protocol.Boot `json:"boot"`
	Image  string        `json:"image,omitempty"`
	Digest string        `json:"digest,omitempty"`
	// NextSession is the first channel session id the saved guest never
	// saw: the ones below it that a fork does not take over (the
	// workload's) are past, and their late frames are dropped.
	NextSession uint32 `json:"nextSession,omitempty"`
}

// workloadSession is the workload's session id: the first a channel
// opens.
const workloadSession = 1

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

// Forked is a sandbox started from a snapshot: its VM, and the running
// sandbox whose workload (the saved one) runs on from where the snapshot
// caught it.
type Forked struct {
	VM      vmm.VM
	Running *Running
	// Workload is the saved workload's session, which the fork took over:
	// its output goes to the sinks Fork was given.
	Workload *stream
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
// workload runs on from where the snapshot caught it, its output going
// to stdout and stderr (nil: dropped).
func Fork(ctx context.Context, driver vmm.Driver, dir, runDir, hostname string, nic Nic, stdout, stderr io.Writer, log *slog.Logger) (*Forked, error) {
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
	f, err := Attach(ctx, driver, vm, saved, runDir, stdout, stderr, log)
	if err == nil {
		err = driver.Resume(ctx, runDir)
	}
	if err != nil {
		return nil, errors.Join(err, vm.Kill())
	}
	f.Running.boot.Hostname, f.Running.boot.Network = hostname, nic.Network
	entropy := make([]byte, 64)
	if _, err = rand.Read(entropy); err == nil {
		err = f.Running.Control(ctx, protocol.Control{Action: protocol.Restored, Hostname: hostname,
			Time: time.Now().UnixNano(), Entropy: entropy, Network: nic.Network})
	}
	if err != nil {
		f.Running.Close()
		return nil, errors.Join(err, vm.Kill())
	}
	return f, nil
}

// Attach connects to the channel of vm, restored from the snapshot saved
// and still paused, and takes over the saved workload's session; the
// caller resumes the VM then (a guest agent that found no host on its
// channel would end the workload and power off). Fork tells the guest it
// is a new sandbox; the benchmarks' bare restore does not.
func Attach(ctx context.Context, driver vmm.Driver, vm vmm.VM, saved *Saved, runDir string, stdout, stderr io.Writer, log *slog.Logger) (*Forked, error) {
	conn, err := vm.Channel(ctx)
	if err != nil {
		return nil, err
	}
	ch := newChannel(conn, saved.NextSession, log)
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	w := ch.adopt(workloadSession, sinks{stdout, stderr})
	go ch.loop(protocol.NewReader(conn))
	r := &Running{ch: ch, driver: driver, runDir: runDir, boot: saved.Boot, image: saved.Image, digest: saved.Digest, log: ch.log}
	return &Forked{VM: vm, Running: r, Workload: w}, nil
}

// RunSnapshot starts a sandbox from the snapshot in dir (a Fork) and runs
// it to its end, as Run does a booted one. With spec.Entrypoint or
// spec.Command set, that command is the workload: it runs as an exec in
// the environment of the snapshot's workload (with spec's Env,
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
	own := len(spec.Entrypoint) == 0 && len(spec.Command) == 0
	var stdout, stderr io.Writer // the saved workload's output: dropped, unless it is the sandbox's
	if own {
		stdout, stderr = sio.Stdout, sio.Stderr
	}
	start := time.Now()
	f, err := Fork(ctx, rt.Driver, dir, runDir, name, Nic{Tap: spec.Tap, Network: spec.Network}, stdout, stderr, log)
	if err != nil {
		return nil, err
	}
	defer func() {
		f.Running.Close()
		err = errors.Join(err, f.VM.Kill())
	}()
	// Its RAM is a private mapping of the snapshot's memory file: only
	// the disk copy (Fork makes it) is its own to reserve. A fork that
	// does not fit ends here.
	if err := rt.reserve(filepath.Join(runDir, snapshotDisk), "", 0); err != nil {
		return nil, err
	}
	log.Debug("forked", "snapshot", dir, "id", id, "took", time.Since(start))
	if spec.WarmUp {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := f.Running.Exec(wctx, ExecSpec{Args: []string{"true"}}, IO{Stdout: io.Discard, Stderr: io.Discard})
		cancel()
		if err != nil {
			log.Warn("warm-up exec", "err", err)
		}
	}
	s := &session{st: f.Workload, proc: saved.Boot.Process, sio: sio, start: start, log: log, vm: f.VM, vmDone: watch(ctx, f.VM, f.Running.ch)}
	// Its stdin's window went with the session it was saved in.
	s.proc.Stdin = false
	started := func() {
		if sio.Running != nil {
			sio.Running(f.Running)
		}
		if sio.Started != nil {
			sio.Started()
		}
	}
	if own {
		s.sio.Started = started
		return s.serve(ctx, time.Minute)
	}
	var boot time.Duration
	eio := sio
	eio.Running, eio.Started = nil, func() {
		boot = time.Since(start)
		started()
	}
	res, err = f.Running.Exec(ctx, ExecSpec{
		Args: append(append([]string(nil), spec.Entrypoint...), spec.Command...),
		Env:  spec.Env, WorkingDir: spec.WorkingDir, User: spec.User,
		TTY: spec.TTY, Stdin: spec.Stdin, Rows: spec.Rows, Cols: spec.Cols,
	}, eio)
	if err != nil {
		return nil, err
	}
	res.Boot = boot
	return res, nil
}
