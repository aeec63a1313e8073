// Package jail confines a VMM process, as Firecracker's jailer does, so
// that an attacker who escapes from the guest into the VMM finds nothing
// around it. Each VMM runs
//
//   - as a uid and gid of its own, leased from a configured range for the
//     VM's life (two VMs never share one, so one cannot signal, trace or
//     open the files of another);
//   - in new mount, pid, ipc, uts and network namespaces: its root is a
//     small tmpfs holding only its VM's run directory, the files it boots
//     from, the host's /usr (QEMU and its libraries) read-only and the
//     device nodes it needs; its network namespace has nothing in it but
//     a down loopback (the VM's tap reaches it as an open file);
//   - in a cgroup of its own with memory, CPU and task limits, through
//     whose cgroup.kill the VM is ended on every path;
//   - with rlimits, no_new_privs and the parent-death signal.
//
// The jail is set up by hearth-jailer (cmd/hearth-jailer, Main here),
// which the VMM driver starts in the new namespaces instead of the VMM: it
// joins the cgroup, builds the root, drops to the leased uid and executes
// the VMM, which keeps its pid. docs/security.md says where this differs
// from Firecracker's jailer and why.
package jail

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"hearth.dev/hearth/internal/config"
)

// Options are a host's jail settings.
type Options struct {
	// Jailer is the hearth-jailer binary.
	Jailer string
	// UIDs is the range VMM uids (and gids, the same numbers) are leased
	// from; LeaseDir holds the leases (one flock-held file per uid in use).
	UIDs     Range
	LeaseDir string
}

// Range is the uids First to First+Count-1.
type Range struct{ First, Count int }

// DefaultRange is the uids that a host's VMMs run as unless
// $HEARTH_JAIL_UIDS says otherwise: far above any account's uid, and
// outside the 100000-165535 that useradd gives to user namespaces.
var DefaultRange = Range{First: 3_000_000, Count: 100_000}

// ParseRange parses "FIRST-LAST".
func ParseRange(s string) (Range, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.Atoi(a)
	last, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || first <= 0 || last < first || last > 1<<31-2 {
		return Range{}, fmt.Errorf("uid range %q: want FIRST-LAST, 0 < FIRST <= LAST", s)
	}
	return Range{First: first, Count: last - first + 1}, nil
}

// Bind is a host path seen at the same path inside the jail.
type Bind struct {
	Path     string `json:"path"`
	Writable bool   `json:"writable,omitempty"`
}

// Spec is what hearth-jailer sets up: it is passed to it as JSON.
type Spec struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Root is an empty directory, not writable by the jail's uid, on
	// which the jail's root is mounted (in the jail's own mount namespace,
	// so that nothing is left mounted on the host when it ends).
	Root  string `json:"root"`
	Binds []Bind `json:"binds"`
	// Devices are character devices made in the jail's /dev, owned by its
	// uid: /dev/kvm where the VM uses KVM.
	Devices []string `json:"devices,omitempty"`
	// Cgroups are the cgroup.procs files the jailer joins first.
	Cgroups []string `json:"cgroups"`
	// NoFile is RLIMIT_NOFILE.
	NoFile uint64 `json:"noFile"`
	// FileSize is RLIMIT_FSIZE: no file the VMM writes grows past it
	// (0: no limit).
	FileSize uint64 `json:"fileSize,omitempty"`
}

// VM is what a jail is made for.
type VM struct {
	ID     string // unique on the host with RunDir: names the cgroup
	RunDir string // the caller's; the jail's writable directory is Dir under it
	Limits Limits
	Binds  []Bind // besides the run directory and the host's /usr
	KVM    bool
	// FileSize bounds every file the VMM writes (RLIMIT_FSIZE): the size
	// of its largest disk or memory file, so that an escaped VMM cannot
	// grow one past what the host reserved for it. 0: no limit.
	FileSize int64
}

// Dir is the directory under a VM's run directory that its jailed VMM
// owns and writes into (its sockets); everything else there stays the
// caller's, so that a VMM taken over by the guest cannot replace a file
// the host later trusts (a symbolic link where a memory file was).
const Dir = "vm"

// Jail is one VMM's confinement, from Prepare until Close.
type Jail struct {
	Spec   Spec
	mu     sync.Mutex // Kill and Close may race: the VM's end and its owner's
	cgroup *Cgroup
	lease  *os.File
}

// Prepare leases a uid, makes the VM's cgroup with its limits, and makes
// the run directory's Dir (owned by the uid) and root mount point.
func (o *Options) Prepare(vm VM) (j *Jail, err error) {
	uid, lease, err := o.lease()
	if err != nil {
		return nil, err
	}
	j = &Jail{lease: lease}
	defer func() {
		if err != nil {
			err = errors.Join(err, j.Close())
		}
	}()
	j.cgroup, err = NewCgroup(cgroupName(vm.RunDir), vm.Limits)
	if err != nil {
		return j, err
	}
	vmDir := filepath.Join(vm.RunDir, Dir)
	root := filepath.Join(vm.RunDir, "root")
	for _, d := range []string{vmDir, root} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return j, fmt.Errorf("jail: %w", err)
		}
	}
	if err := os.Chown(vmDir, uid, uid); err != nil {
		return j, fmt.Errorf("jail: %w", err)
	}
	j.Spec = Spec{UID: uid, GID: uid, Root: root, Cgroups: j.cgroup.Procs(), NoFile: 4096, FileSize: uint64(max(vm.FileSize, 0)),
		Binds: append([]Bind{{Path: vmDir, Writable: true}}, vm.Binds...)}
	if vm.KVM {
		j.Spec.Devices = append(j.Spec.Devices, "/dev/kvm")
	}
	return j, nil
}

// Cgroup is the VMM's cgroup.
func (j *Jail) Cgroup() *Cgroup { return j.cgroup }

// Command is an exec.Cmd that runs path with args inside the jail: the
// jailer, in new namespaces, which executes path once the jail is made.
// The caller adds its files, output and further SysProcAttr fields.
func (j *Jail) Command(jailer, path string, args []string) (*exec.Cmd, error) {
	spec, err := json.Marshal(j.Spec)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(jailer, append([]string{string(spec), "--", path}, args...)...)
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWNET |
			syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS,
		// If the process that owns the VM dies, the VMM dies with it (the
		// jailer sets it again once it has changed uid, which clears it).
		Pdeathsig: syscall.SIGKILL,
	}
	return cmd, nil
}

// Kill ends every process of the jail.
func (j *Jail) Kill() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.cgroup == nil {
		return nil
	}
	return j.cgroup.Kill()
}

// Close kills what is left, removes the cgroup and releases the uid.
func (j *Jail) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	var err error
	if j.cgroup != nil {
		err = j.cgroup.Remove()
		j.cgroup = nil
	}
	if j.lease != nil {
		// The lease file stays: removing it would race with another
		// process that has it open and is about to lock it.
		j.lease.Close()
		j.lease = nil
	}
	return err
}

// cgroupName names a VM's cgroup by its run directory: the run root's hash
// (so that a sweep of one run root never touches another's VMs) and the
// run directory's name.
func cgroupName(runDir string) string {
	return rootPrefix(filepath.Dir(runDir)) + filepath.Base(runDir)
}

func rootPrefix(runRoot string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(runRoot)))
	return "vm-" + hex.EncodeToString(sum[:5]) + "-"
}

// Sweep ends the VMMs of run root whose owner is gone: it kills and
// removes each VMM cgroup made for a run directory under runRoot for which
// alive is false, and returns the run directories it found so.
func Sweep(runRoot string, alive func(runDir string) bool) ([]string, error) {
	prefix := rootPrefix(runRoot)
	names, err := cgroupNames(prefix)
	if err != nil {
		return nil, err
	}
	var found []string
	var errs []error
	for _, n := range names {
		dir := filepath.Join(runRoot, strings.TrimPrefix(n, prefix))
		if alive(dir) {
			continue
		}
		cg, err := openCgroup(n)
		if err == nil {
			err = cg.Remove()
		}
		errs = append(errs, err)
		found = append(found, dir)
	}
	return found, errors.Join(errs...)
}

// HostOptions are the jail settings of this host: hearth-jailer found by
// config.Jailer, the uids of $HEARTH_JAIL_UIDS (FIRST-LAST) or
// DefaultRange, and leases under config.JailDir.
func HostOptions() (*Options, error) {
	jailer, err := config.Jailer()
	if err != nil {
		return nil, err
	}
	o := &Options{Jailer: jailer, UIDs: DefaultRange, LeaseDir: filepath.Join(config.JailDir, "uids")}
	if s := os.Getenv("HEARTH_JAIL_UIDS"); s != "" {
		if o.UIDs, err = ParseRange(s); err != nil {
			return nil, fmt.Errorf("$HEARTH_JAIL_UIDS: %w", err)
		}
	}
	return o, nil
}
