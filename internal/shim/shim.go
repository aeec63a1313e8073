// Package shim is the per-sandbox supervisor on a host, as containerd's
// shims are for containers: one process per run of a sandbox that boots the
// VM through internal/sandbox, writes the workload's output to its log file
// and its progress to a state file, and outlives the node agent that started
// it. A node agent that restarts finds its sandboxes' shims by their run
// directories and adopts them: it neither kills nor duplicates a VM.
//
// The shim works in its run directory (its working directory) by relative
// paths only, so that the directory can be moved while it runs: a warm
// pool's sandbox handed to the sandbox that claims it moves to that
// sandbox's directory.
//
// A run directory holds:
//
//	spec.json   what to run (written by the node agent before the start)
//	lock        flock-held by the shim for its whole life: held means alive
//	pid         the shim's process id (written by the node agent)
//	state.json  what happened (written by the shim, replaced atomically)
//	shim.log    the shim's own messages
//	shim.sock   the shim's API, while the workload runs (api.go)
//	stdin.sock  the workload's stdin, for attach (Spec.Sandbox.Stdin)
//	migration   the UID of the Migration sending the run's sandbox away
//	            (written by the node agent, internal/node/migrate.go)
//
// A run migrates its sandbox out through its API (OpMigrate, Migrate), or
// takes one in over its fd 4 (StartIncoming, Spec.Incoming).
package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/sandbox"
)

// Spec is what one run runs.
type Spec struct {
	Sandbox sandbox.Spec `json:"sandbox"`
	// Snapshot, if set, is a memory snapshot (an absolute path) to start
	// the sandbox from instead of booting: sandbox.RunSnapshot.
	Snapshot string `json:"snapshot,omitempty"`
	// Log is where the workload's output goes; a relative path is from
	// the run directory.
	Log    string `json:"log"`
	LogMax int64  `json:"logMax"` // bytes before rotation
	Accel  string `json:"accel"`
	// Host is where the VMM and the guest's files are: the shim takes
	// them from here, not from the environment it inherited.
	Host sandbox.Host `json:"host"`
	// ImageDir is the image store the shim pulls into.
	ImageDir string `json:"imageDir"`
	// Reserve gives the VM's writable disk and memory file their blocks
	// when they are made (sandbox.Runtime.Reserve): the node's VMs, in
	// its VM state directory (Host.RunRoot) on a real filesystem.
	Reserve bool `json:"reserve,omitempty"`
	// StdinOnce closes the workload's stdin when the first client's input
	// on stdin.sock ends.
	StdinOnce bool `json:"stdinOnce,omitempty"`
	// InsecureRegistries are reached over plain HTTP.
	InsecureRegistries []string `json:"insecureRegistries,omitempty"`
	// Tenant: the image is an API user's (a node's sandbox): pulls are
	// guarded (image.SourceOptions.Guard: no loopback, private or
	// link-local registry but PrivateRegistries and InsecureRegistries)
	// and never use this host's own registry credentials.
	Tenant            bool     `json:"tenant,omitempty"`
	PrivateRegistries []string `json:"privateRegistries,omitempty"`
	// RefusedAddrs are the cluster's hosts' and control plane's
	// addresses: no registry of a tenant's may be at one
	// (image.SourceOptions.Refused).
	RefusedAddrs []netip.Addr `json:"refusedAddrs,omitempty"`
	// Incoming: the sandbox is not booted but migrates in (a
	// sandbox.Runtime.RunIncoming) over the stream socket that is the
	// shim's fd 4 (StartIncoming), from the shim of its source (Migrate).
	Incoming bool `json:"incoming,omitempty"`
	// PullSecrets are the docker configs (.dockerconfigjson) of the
	// sandbox's image pull secrets. The shim takes them out of spec.json
	// once it has read them: credentials stay on disk no longer than the
	// shim's start.
	PullSecrets [][]byte `json:"pullSecrets,omitempty"`
}

// Phases of a run.
const (
	Booting = "booting" // pulling the image, booting the VM
	Running = "running"
	Exited  = "exited"
)

// MaxMessage bounds State.Message, which reaches the API's status: the
// guest's exit message is the attacker's text (up to a frame, 1 MiB), and
// a restarting sandbox writes it again on every run.
const MaxMessage = 1024

// ClipMessage is s cut to MaxMessage bytes at a rune boundary, marked when
// cut, and made valid UTF-8.
func ClipMessage(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= MaxMessage {
		return s
	}
	const more = "… (cut)"
	i := MaxMessage - len(more)
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + more
}

// State is what the shim reports.
type State struct {
	Phase      string    `json:"phase"`
	StartedAt  time.Time `json:"startedAt,omitzero"`
	FinishedAt time.Time `json:"finishedAt,omitzero"`
	BootMillis int64     `json:"bootMillis,omitempty"`
	ExitCode   int       `json:"exitCode"`
	Signal     int       `json:"signal,omitempty"`
	// Reason is a CamelCase word when the run did not end by itself or
	// did not start: Completed, Error, OOMKilled, DiskFull, StartError,
	// ImagePullError, BootError, BadSnapshot, Killed; Migrated (the
	// sandbox runs on in another host's run), MigrationFailed (an
	// incoming run that did not take the sandbox over).
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
	// Prepared: an incoming run has the image and waits for the stream
	// (sandbox.IO.Prepared): the source may send.
	Prepared bool `json:"prepared,omitempty"`
	// HandedOver: an incoming run's source has handed the sandbox over
	// (sandbox.IO.HandedOver): this run's VM is its only one.
	HandedOver bool `json:"handedOver,omitempty"`
}

// Files of a run directory.
const (
	specFile  = "spec.json"
	lockFile  = "lock"
	stateFile = "state.json"
	logFile   = "shim.log"
	pidFile   = "pid"
	// stdinSock takes the workload's stdin (Spec.Sandbox.Stdin), for attach.
	stdinSock = "stdin.sock"
)

// StatePath is the run's state file, replaced whenever the state changes.
func StatePath(dir string) string { return filepath.Join(dir, stateFile) }

// StdinSocket is where the run takes its workload's stdin.
func StdinSocket(dir string) string { return filepath.Join(dir, stdinSock) }

// Start starts a shim for spec in dir, which must not exist yet. The lock
// is taken here and handed to the shim as its fd 3, so that there is no
// moment in which the run exists but looks dead. exe is the hearth-shim
// binary (cmd/hearth-shim), whose main is Main.
func Start(dir string, spec Spec, exe string) (int, error) {
	return start(dir, spec, exe, nil)
}

// StartIncoming starts a shim in dir for the sandbox of spec that
// migrates in over stream, a stream socket from the source's shim
// (Migrate) or a relay of it: the shim's fd 4, the caller keeps its own.
func StartIncoming(dir string, spec Spec, exe string, stream *os.File) (int, error) {
	spec.Incoming = true
	return start(dir, spec, exe, stream)
}

func start(dir string, spec Spec, exe string, stream *os.File) (int, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return 0, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return 0, fmt.Errorf("run directory: %w", err)
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, specFile), b, 0o600); err != nil {
		return 0, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return 0, err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return 0, fmt.Errorf("lock run directory: %w", err)
	}
	out, err := os.OpenFile(filepath.Join(dir, logFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	cmd := exec.Command(exe, dir)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = []*os.File{lock}
	if stream != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, stream)
	}
	// Its own session: not in the node agent's process group, so a Ctrl-C
	// or a SIGKILL of the agent leaves it (and its VM) running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start shim: %w", err)
	}
	pid := cmd.Process.Pid
	if err := os.WriteFile(filepath.Join(dir, pidFile), []byte(strconv.Itoa(pid)), 0o600); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return 0, err
	}
	// Nobody waits for it but init once the agent is gone; while the agent
	// lives, reap it so that it does not linger as a zombie.
	go func() { _ = cmd.Wait() }()
	return pid, nil
}

// Alive reports whether the shim of dir still holds its lock.
func Alive(dir string) bool {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// takeSecrets rewrites spec.json without the spec's pull secrets.
func takeSecrets(dir string, s Spec) error {
	if len(s.PullSecrets) == 0 {
		return nil
	}
	s.PullSecrets = nil
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, specFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, specFile))
}

// ReadSpec reads the spec the run was started with.
func ReadSpec(dir string) (Spec, error) {
	var s Spec
	b, err := os.ReadFile(filepath.Join(dir, specFile))
	if err == nil {
		err = json.Unmarshal(b, &s)
	}
	if err != nil {
		return Spec{}, fmt.Errorf("the run's spec: %w", err)
	}
	return s, nil
}

// ReadState reads the run's state; a run whose shim has not written one
// yet is Booting.
func ReadState(dir string) (State, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return State{Phase: Booting}, nil
	}
	if err != nil {
		return State{}, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("%s: %w", filepath.Join(dir, stateFile), err)
	}
	return s, nil
}

func writeState(dir string, s State) error { return writeJSON(filepath.Join(dir, stateFile), s) }

// writeJSON replaces path atomically: readers see the old or the new file.
func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Stop asks the shim to end its VM (SIGTERM) and waits until it has; after
// grace it kills it, which kills the VM too (QEMU dies with its parent).
// Only a shim that still holds the lock is signalled, so a recycled pid is
// never hit.
func Stop(ctx context.Context, dir string, grace time.Duration) error {
	b, err := os.ReadFile(filepath.Join(dir, pidFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !Alive(dir) {
			return nil
		}
		return fmt.Errorf("shim pid: %w", err)
	}
	pid, err := strconv.Atoi(string(b))
	if err != nil || pid <= 0 {
		return fmt.Errorf("shim pid %q: %v", b, err)
	}
	signal := func(sig syscall.Signal) {
		if Alive(dir) {
			_ = syscall.Kill(pid, sig)
		}
	}
	signal(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for Alive(dir) {
		if time.Now().After(deadline) {
			signal(syscall.SIGKILL)
			deadline = time.Now().Add(time.Hour)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
