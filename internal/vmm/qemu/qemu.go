// Package qemu is the QEMU driver: the microvm machine, virtio-mmio devices,
// QMP over a unix socket, and the guest agent's channel on a virtio-serial
// port. It runs with KVM where the host has it and with TCG elsewhere.
package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/vmm"
)

// Driver starts QEMU microvm guests.
type Driver struct {
	// Binary is the QEMU executable; "qemu-system-x86_64" on PATH if empty.
	Binary string
	// Jail, if set, confines each QEMU (internal/jail: its own uid,
	// namespaces, root and cgroup). It needs root. Without it, QEMU runs
	// as the caller, or as "nobody" once started when the caller is root.
	Jail *jail.Options
}

var _ vmm.Driver = (*Driver)(nil)

// Name is "qemu".
func (d *Driver) Name() string { return "qemu" }

// Files under the run directory: vm.json in it, the sockets in its
// subdirectory jail.Dir, which a jailed QEMU owns.
const (
	qmpSock     = "qmp.sock"
	controlSock = "control.sock" // a second QMP monitor, for other processes (snapshot, pause)
	vmFile      = "vm.json"      // the vmm.Config the VM was started with
	agentSock   = "agent.sock"
	consoleSock = "console.sock" // hearth listens, QEMU connects
)

// unprivilegedUser is who QEMU runs as after start-up when hearth is root
// and QEMU is not jailed.
const unprivilegedUser = "nobody"

// sock is the path of QEMU's socket name in the VM of runDir.
func sock(runDir, name string) string { return filepath.Join(runDir, jail.Dir, name) }

// vmmOverheadMiB is what a QEMU process may use beyond guest RAM before its
// cgroup kills it: its own heap, device model and I/O buffers and, under
// TCG, the translation cache (32 MiB) — measured by hearth bench boot,
// which reports the VMM's private memory beyond guest RAM.
// (A variable: a test drives a QEMU past its limit.)
var vmmOverheadMiB = func(accel vmm.Accel) int {
	if accel == vmm.TCG {
		return 160
	}
	return 96
}

// vmmTasks bounds a QEMU's threads: vCPUs, the main loop, RCU and up to
// 64 block I/O workers.
const vmmTasks = 256

// logTail is how much of the console and of QEMU's own output is kept for
// error messages. The guest may print without end: a file would let it fill
// the host's disk.
const logTail = 64 << 10

// baseCmdline is what every guest needs:
//   - console=ttyS0: early and panic messages go to the console log;
//   - quiet: under TCG every console byte is an emulated UART write;
//   - panic=-1 and reboot=t with QEMU's -no-reboot: a guest panic, or the
//     agent's final reboot(2), ends the QEMU process at once (a triple fault
//     needs no ACPI or keyboard controller);
//   - rdinit=/init: hearth-agent in the initramfs.
const baseCmdline = "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init 8250.nr_uarts=1"

// tscCmdline gives a TCG guest the host's TSC frequency. Under TCG the
// guest's TSC runs at the host's, but the guest cannot calibrate it (no
// HPET or PM timer on microvm, the emulated PIT too jittery: "Marking TSC
// unstable due to could not calculate TSC khz"), falls back to the jiffies
// clocksource and can then never stop its tick: an idle guest took 250
// timer interrupts a second, about 5% of a host CPU each, which a host
// full of idle warm-pool sandboxes could not afford. With the frequency
// given (tsc_early_khz) and the watchdog off (tsc=reliable: there is no
// better clock to check it against) the guest runs tickless on the TSC.
// Taken from the host's /proc/cpuinfo when its TSC is invariant.
func tscCmdline(accel vmm.Accel) string {
	if accel != vmm.TCG {
		return ""
	}
	tscOnce.Do(func() {
		b, err := os.ReadFile("/proc/cpuinfo")
		if err != nil {
			return
		}
		info := string(b)
		if !strings.Contains(info, " constant_tsc") || !strings.Contains(info, " nonstop_tsc") {
			return
		}
		for _, line := range strings.Split(info, "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
				if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil && mhz > 0 {
					tscArgs = fmt.Sprintf(" tsc_early_khz=%d tsc=reliable", int64(mhz*1000))
				}
				return
			}
		}
	})
	return tscArgs
}

var (
	tscOnce sync.Once
	tscArgs string
)

// Args returns QEMU's command line for cfg, unjailed.
func Args(cfg vmm.Config) []string { return args(cfg, cfg.MemoryFile, true, false) }

// args is QEMU's command line with guest RAM in memFile (if not ""),
// mapped shared (the file is the RAM) or private (copy-on-write over a
// snapshot's memory, which the VM never changes).
//
// Snapshots use x-ignore-shared migration, as Kata Containers' VM
// templates do: the source's RAM is a shared file mapping, so the
// migration stream carries only device state; the destination maps the
// saved file privately and receives no pages, so it runs on the file's
// contents, and clones of one snapshot share its page cache.
//
// Jailed, QEMU also may not change its uid (elevateprivileges=deny): it
// starts as the jail's; unjailed as root it needs -runas.
func args(cfg vmm.Config, memFile string, shared, jailed bool) []string {
	run := func(name string) string { return sock(cfg.RunDir, name) }
	seccomp := "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
	if jailed {
		seccomp += ",elevateprivileges=deny"
	}
	machine := "microvm,acpi=off,pcie=off,isa-serial=on,x-option-roms=off"
	var memory []string
	if memFile != "" {
		machine += ",memory-backend=ram"
		share := "off"
		if shared {
			share = "on"
		}
		memory = []string{"-object", fmt.Sprintf("memory-backend-file,id=ram,size=%dM,mem-path=%s,share=%s", cfg.MemoryMiB, memFile, share)}
	}
	cpu := "max"
	accel := "tcg,thread=multi"
	if cfg.Accel == vmm.KVM {
		cpu, accel = "host", "kvm"
	}
	args := []string{
		"-name", "hearth-" + cfg.ID,
		"-machine", machine,
		"-accel", accel,
		"-cpu", cpu,
		"-smp", strconv.Itoa(max(cfg.VCPUs, 1)),
		"-m", strconv.Itoa(cfg.MemoryMiB) + "M",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// Defence in depth should the guest break out of the device
		// model: QEMU's seccomp filter (no spawning, no obsolete or
		// resource-control syscalls, no setuid when jailed).
		"-sandbox", seccomp,
		"-kernel", cfg.Kernel,
		"-initrd", cfg.Initrd,
		"-append", strings.TrimSpace(baseCmdline + tscCmdline(cfg.Accel) + " " + cfg.Cmdline),
		// The console goes to a socket hearth listens on before QEMU
		// starts, so QEMU's connect succeeds at once and no early output
		// is lost.
		"-chardev", "socket,id=console,path=" + run(consoleSock) + ",server=off",
		"-serial", "chardev:console",
		"-qmp", "unix:" + run(qmpSock) + ",server=on,wait=off",
		// QEMU serves each monitor one client at a time, and the process
		// that started the VM keeps the first for its life.
		"-qmp", "unix:" + run(controlSock) + ",server=on,wait=off",
		// One port: the guest agent's channel, which carries every
		// session (the workload's, execs, controls) by id. Each port
		// costs the guest about 4 MiB (virtio_console fills its receive
		// queue with page-sized buffers), and a port is one connection.
		// Two: port 0 is kept for a console, so the agent's is port 1
		// (the guest's vport0p1).
		"-device", "virtio-serial-device,max_ports=2",
		"-device", "virtio-rng-device",
		"-netdev", netdev(cfg.Net, tapFD(cfg)),
		"-device", "virtio-net-device,netdev=net0,mac=" + vmm.GuestMAC,
	}
	args = append(args, memory...)
	args = append(args,
		"-chardev", "socket,id=channel,path="+run(agentSock)+",server=on,wait=off",
		"-device", "virtserialport,chardev=channel,name="+cfg.Channel)
	// Drives are opened by hearth and handed to QEMU as file descriptors
	// in fd sets (driveFiles), never by path: QEMU runs as nobody and
	// cannot reach the run directory, yet it reopens a writable drive
	// read-only when a migration (a snapshot) ends, which by path fails
	// ("bdrv_inactivate_all() failed"). QEMU's image locking is off: its
	// OFD locks on one set's two descriptors conflict with each other
	// ("Failed to get "write" lock" when the VM resumes), and hearth gives
	// each writable disk to one VM (forks get copies).
	fd := 3
	for i, d := range cfg.Drives {
		set := i + 1
		args = append(args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", fd, set))
		fd++
		drive := fmt.Sprintf("id=%s,file=/dev/fdset/%d,file.locking=off,format=raw,if=none,readonly=on", d.ID, set)
		if !d.ReadOnly {
			args = append(args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", fd, set))
			fd++
			// discard=ignore: a guest's TRIM must not punch holes in a
			// disk whose blocks the host reserved for it (a node VM's,
			// sandbox.Runtime.Reserve), or its later writes could find
			// the host's filesystem full after all.
			drive = fmt.Sprintf("id=%s,file=/dev/fdset/%d,file.locking=off,format=raw,if=none,cache=unsafe,discard=ignore", d.ID, set)
		}
		args = append(args, "-drive", drive,
			"-device", fmt.Sprintf("virtio-blk-device,drive=%s,serial=%s", d.ID, d.Serial))
	}
	return args
}

// netdev is the backend of the VM's interface: its tap, opened by hearth
// and passed as file descriptor fd (a jailed QEMU's network namespace has
// no tap, and it could not open one; no vhost: /dev/vhost-net is not
// everywhere), or a hub port with nothing else on the hub, which drops
// what the guest sends.
func netdev(n vmm.Net, fd int) string {
	if n.Tap == "" {
		return "hubport,id=net0,hubid=0"
	}
	return fmt.Sprintf("tap,id=net0,fd=%d,vhost=off", fd)
}

// tapFD is the tap's descriptor in QEMU: after the drives' (vmFiles).
func tapFD(cfg vmm.Config) int {
	fd := 3
	for _, d := range cfg.Drives {
		fd++
		if !d.ReadOnly {
			fd++
		}
	}
	return fd
}

// openTap opens the tap device name as QEMU would by name: no packet
// information header, with the virtio-net header (QEMU probes for it, and
// a snapshot's device state depends on it).
func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: TUNSETIFF: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tap"), nil
}

// vmFiles opens the drives' files in the order args numbers them: one
// read-only descriptor per drive, and a read-write one after it for a
// writable drive; then the tap.
func vmFiles(cfg vmm.Config) ([]*os.File, error) {
	var files []*os.File
	open := func(path string, flag int) error {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return fmt.Errorf("drive: %w", err)
		}
		files = append(files, f)
		return nil
	}
	for _, d := range cfg.Drives {
		err := open(d.Path, os.O_RDONLY)
		if err == nil && !d.ReadOnly {
			err = open(d.Path, os.O_RDWR)
		}
		if err != nil {
			closeAll(files)
			return nil, err
		}
	}
	if cfg.Net.Tap != "" {
		tap, err := openTap(cfg.Net.Tap)
		if err != nil {
			closeAll(files)
			return nil, err
		}
		files = append(files, tap)
	}
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// Start launches QEMU and returns once its QMP socket answers.
func (d *Driver) Start(ctx context.Context, cfg vmm.Config) (vmm.VM, error) {
	vm, err := d.launch(ctx, cfg, cfg.MemoryFile, true)
	if err != nil {
		return nil, err
	}
	if err := vm.checkRunning(); err != nil {
		return nil, vm.fail(err)
	}
	return vm, nil
}

// launch starts QEMU for cfg with guest RAM in memFile (see args), and
// extra arguments, and connects to its QMP socket. Jailed, QEMU starts in
// its jail; otherwise, as root, it drops to "nobody" once started.
func (d *Driver) launch(ctx context.Context, cfg vmm.Config, memFile string, shared bool, extra ...string) (*VM, error) {
	return d.launchWith(ctx, cfg, memFile, shared, nil, extra...)
}

// launchWith is launch giving QEMU stream (if not nil) as its last
// descriptor, streamFD; the caller keeps its own.
func (d *Driver) launchWith(ctx context.Context, cfg vmm.Config, memFile string, shared bool, stream *os.File, extra ...string) (*VM, error) {
	if cfg.Channel == "" {
		return nil, errors.New("qemu: the VM's config names no agent channel")
	}
	bin := d.Binary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (install it with: apt-get install qemu-system-x86)", err)
	}
	if path, err = filepath.Abs(path); err != nil {
		return nil, err
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(cfg.RunDir, vmFile), b, 0o600); err != nil {
		return nil, err
	}
	vm := &VM{cfg: cfg, done: make(chan struct{}),
		console: &vmm.TailBuffer{Max: logTail}, output: &vmm.TailBuffer{Max: logTail}}
	args := append(args(cfg, memFile, shared, d.Jail != nil), extra...)
	var cmd *exec.Cmd
	if d.Jail != nil {
		if vm.jail, err = d.prepareJail(cfg, path, memFile, shared); err != nil {
			return nil, err
		}
		// Until QEMU runs; then its end closes the jail.
		defer func() {
			if vm.cmd == nil {
				_ = vm.jail.Close()
			}
		}()
		if cmd, err = vm.jail.Command(d.Jail.Jailer, path, args); err != nil {
			return nil, err
		}
	} else {
		if err := os.Mkdir(filepath.Join(cfg.RunDir, jail.Dir), 0o700); err != nil {
			return nil, fmt.Errorf("run directory: %w", err)
		}
		if os.Geteuid() == 0 {
			if _, err := user.Lookup(unprivilegedUser); err == nil {
				args = append(args, "-runas", unprivilegedUser)
			}
		}
		cmd = exec.Command(path, args...)
		// If hearth dies without cleaning up, QEMU must not outlive it.
		// (-runas clears this; then the guest agent, seeing the channel
		// close, powers the VM off. A jailed QEMU keeps it.)
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	// Its own process group: a Ctrl-C at the terminal is for the
	// workload (hearth forwards it), not for QEMU.
	cmd.SysProcAttr.Setpgid = true
	console, err := net.Listen("unix", sock(cfg.RunDir, consoleSock))
	if err != nil {
		return nil, fmt.Errorf("console socket: %w", err)
	}
	if vm.jail != nil {
		// QEMU connects to it as the jail's uid.
		if err := os.Chown(sock(cfg.RunDir, consoleSock), vm.jail.Spec.UID, vm.jail.Spec.GID); err != nil {
			console.Close()
			return nil, err
		}
	}
	consoleDone := make(chan struct{})
	go func() {
		defer close(consoleDone)
		vm.readConsole(console)
	}()
	files, err := vmFiles(cfg)
	if err != nil {
		console.Close()
		return nil, err
	}
	defer closeAll(files) // QEMU has its own copies once started
	cmd.ExtraFiles = files
	if stream != nil {
		cmd.ExtraFiles = append(slices.Clip(files), stream)
	}
	cmd.Stdout, cmd.Stderr = vm.output, vm.output
	if err := cmd.Start(); err != nil {
		console.Close()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	vm.cmd = cmd
	go func() {
		vm.waitErr = cmd.Wait()
		console.Close() // if QEMU failed before it connected
		if vm.jail != nil {
			// QEMU was its pid namespace's init: with it, everything in
			// the jail is gone. The cgroup and the uid go now.
			vm.closeErr = vm.jail.Close()
		}
		// The guest's last words (a panic) must be in the tail before
		// anyone learns that the VM is gone and asks for them.
		select {
		case <-consoleDone:
		case <-time.After(time.Second):
		}
		close(vm.done)
	}()
	if err := vm.connectQMP(ctx); err != nil {
		return nil, vm.fail(err)
	}
	if vm.jail != nil {
		if err := sealSockets(cfg.RunDir); err != nil {
			return nil, vm.fail(err)
		}
	}
	return vm, nil
}

// sealSockets takes the jail's directory back from its uid once QEMU has
// made its sockets there (it makes them all before its QMP socket
// answers), and checks that each entry is a socket: from then on a QEMU
// taken over by the guest cannot put a symbolic link where a socket was,
// which hearth, dialling as root, would follow to another VM's channel.
func sealSockets(runDir string) error {
	dir := filepath.Join(runDir, jail.Dir)
	if err := os.Chown(dir, 0, 0); err != nil {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type() != os.ModeSocket {
			return fmt.Errorf("the jail's %s is not a socket (%v)", e.Name(), e.Type())
		}
	}
	return nil
}

// prepareJail makes the jail of the VM cfg: its cgroup limits from the
// VM's size, and in its root the kernel, the initrd, the QEMU binary where
// it is not under /usr, and the memory file. A new memory file is made
// here, owned by the jail's uid, since the jail cannot create files in the
// run directory; a snapshot's (restored, not shared) is opened by QEMU
// 7.2 for writing even when mapped privately, so it is made writable for
// the jail (docs/security.md: what that leaves open, and the fix).
func (d *Driver) prepareJail(cfg vmm.Config, qemu, memFile string, shared bool) (*jail.Jail, error) {
	for _, f := range []string{cfg.Kernel, cfg.Initrd} {
		fi, err := os.Stat(f)
		if err != nil {
			return nil, err
		}
		if fi.Mode().Perm()&0o004 == 0 {
			return nil, fmt.Errorf("%s is not readable by others, and a jailed QEMU runs as a uid of its own: chmod o+r it", f)
		}
	}
	binds := []jail.Bind{{Path: cfg.Kernel}, {Path: cfg.Initrd}}
	if !strings.HasPrefix(qemu, "/usr/") {
		binds = append(binds, jail.Bind{Path: qemu})
	}
	if memFile != "" {
		binds = append(binds, jail.Bind{Path: memFile, Writable: true})
	}
	// No file it writes grows past its largest disk or its RAM.
	fileSize := int64(cfg.MemoryMiB) << 20
	for _, dr := range cfg.Drives {
		if fi, err := os.Stat(dr.Path); err == nil && !dr.ReadOnly {
			fileSize = max(fileSize, fi.Size())
		}
	}
	j, err := d.Jail.Prepare(jail.VM{ID: cfg.ID, RunDir: cfg.RunDir, Binds: binds, KVM: cfg.Accel == vmm.KVM, FileSize: fileSize,
		Limits: jail.Limits{
			MemoryBytes: int64(cfg.MemoryMiB+vmmOverheadMiB(cfg.Accel)) << 20,
			// One core beyond the vCPUs for QEMU's own threads (the main
			// loop and I/O emulate the devices): held to the vCPUs
			// alone, a TCG boot took 70 ms longer (hearth bench boot).
			CPUs: float64(max(cfg.VCPUs, 1) + 1),
			Pids: vmmTasks,
		}})
	if err != nil {
		return nil, err
	}
	if memFile != "" {
		if shared {
			err = createOwned(memFile, j.Spec.UID, j.Spec.GID)
		} else {
			err = os.Chmod(memFile, 0o666)
		}
		if err != nil {
			return nil, errors.Join(fmt.Errorf("memory file: %w", err), j.Close())
		}
	}
	return j, nil
}

// createOwned gives the file at path, created empty if it is not there
// (the caller may have reserved its blocks), to uid and gid.
func createOwned(path string, uid, gid int) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Chown(uid, gid)
}

// fail kills the VM and returns err with its logs.
func (v *VM) fail(err error) error {
	err = errors.Join(err, v.Kill())
	if logs := v.Logs(2048); logs != "" {
		err = fmt.Errorf("%w\n%s", err, logs)
	}
	return err
}

// VM is one QEMU process.
type VM struct {
	cfg     vmm.Config
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	mon     *monitor
	once    sync.Once
	jail    *jail.Jail // nil if unjailed
	// closeErr is the jail's removal's, once done is closed.
	closeErr error
	console  *vmm.TailBuffer // the guest's serial console
	output   *vmm.TailBuffer // QEMU's own stdout and stderr
}

// readConsole takes QEMU's one connection to the console socket and keeps
// the tail of what the guest prints.
func (v *VM) readConsole(l net.Listener) {
	c, err := l.Accept()
	l.Close()
	if err != nil {
		return
	}
	defer c.Close()
	_, _ = io.Copy(v.console, c)
}

var _ vmm.VM = (*VM)(nil)

func (v *VM) path(name string) string { return sock(v.cfg.RunDir, name) }

// connectQMP waits for QEMU to create its QMP socket (it does so early,
// before the guest runs) and checks that the VM is running.
func (v *VM) connectQMP(ctx context.Context) error {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(v.path(qmpSock)); err == nil {
			if mon, err := dialMonitor(v.path(qmpSock)); err == nil {
				mon.done, mon.exitErr = v.done, func() error { return v.waitErr }
				v.mon = mon
				return nil
			}
		}
		select {
		case <-v.done:
			return fmt.Errorf("%w during start: %v", vmm.ErrExited, v.waitErr)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func (v *VM) checkRunning() error {
	st, err := v.mon.status()
	if err != nil {
		return err
	}
	if st != "running" {
		return fmt.Errorf("qemu is %s, not running", st)
	}
	return nil
}

// Channel connects to the agent's virtio-serial chardev, which takes one
// connection at a time: the VM's owner keeps it. QEMU created it before
// its QMP socket answered, so no retry is needed.
func (v *VM) Channel(ctx context.Context) (net.Conn, error) {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "unix", sock(v.cfg.RunDir, agentSock))
	if err != nil {
		return nil, fmt.Errorf("connect to the guest agent's channel: %w", err)
	}
	return c, nil
}

// Wait returns when QEMU has exited.
func (v *VM) Wait(ctx context.Context) error {
	select {
	case <-v.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	var ee *exec.ExitError
	if errors.As(v.waitErr, &ee) && ee.ExitCode() == 0 {
		return nil
	}
	if v.waitErr != nil {
		return fmt.Errorf("%w: %v", vmm.ErrExited, v.waitErr)
	}
	return nil
}

// Kill ends QEMU and waits for it and its jail to be gone.
func (v *VM) Kill() error {
	v.once.Do(func() {
		if v.mon != nil {
			_ = v.mon.Disconnect()
		}
		select {
		case <-v.done:
		default:
			// Jailed, through the cgroup: nothing in it survives.
			if v.jail != nil {
				_ = v.jail.Kill()
			} else {
				_ = v.cmd.Process.Kill()
			}
		}
	})
	<-v.done
	return v.closeErr
}

// Pid is QEMU's process id.
func (v *VM) Pid() int { return v.cmd.Process.Pid }

// Logs returns the tails of QEMU's own output and the guest console.
func (v *VM) Logs(n int) string {
	var parts []string
	if s := v.output.Tail(n); s != "" {
		parts = append(parts, "qemu output:\n"+s)
	}
	if s := v.console.Tail(n); s != "" {
		parts = append(parts, "guest console:\n"+s)
	}
	return strings.Join(parts, "\n")
}
