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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/vmm"
)

// Driver starts QEMU microvm guests.
type Driver struct {
	// Binary is the QEMU executable; "qemu-system-x86_64" on PATH if empty.
	Binary string
}

var _ vmm.Driver = (*Driver)(nil)

// Name is "qemu".
func (d *Driver) Name() string { return "qemu" }

// Files under the run directory.
const (
	qmpSock     = "qmp.sock"
	controlSock = "control.sock" // a second QMP monitor, for other processes (snapshot, pause)
	vmFile      = "vm.json"      // the vmm.Config the VM was started with
	agentSock   = "agent.sock"
	consoleSock = "console.sock" // hearth listens, QEMU connects
)

// unprivilegedUser is who QEMU runs as after start-up when hearth is root.
const unprivilegedUser = "nobody"

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

// Args returns QEMU's command line for cfg.
func Args(cfg vmm.Config) []string { return args(cfg, cfg.MemoryFile, true) }

// args is QEMU's command line with guest RAM in memFile (if not ""),
// mapped shared (the file is the RAM) or private (copy-on-write over a
// snapshot's memory, which the VM never changes).
//
// Snapshots use x-ignore-shared migration, as Kata Containers' VM
// templates do: the source's RAM is a shared file mapping, so the
// migration stream carries only device state; the destination maps the
// saved file privately and receives no pages, so it runs on the file's
// contents, and clones of one snapshot share its page cache.
func args(cfg vmm.Config, memFile string, shared bool) []string {
	run := func(name string) string { return filepath.Join(cfg.RunDir, name) }
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
		// resource-control syscalls). As root, Start also drops QEMU to
		// "nobody" once it has opened its files.
		"-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
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
		"-device", fmt.Sprintf("virtio-serial-device,max_ports=%d", protocol.ExecPorts+2),
		"-device", "virtio-rng-device",
		"-netdev", netdev(cfg.Net),
		"-device", "virtio-net-device,netdev=net0,mac=" + vmm.GuestMAC,
	}
	args = append(args, memory...)
	// Port 0 carries the workload's session; 1 to ExecPorts exec sessions.
	for i := 0; i <= protocol.ExecPorts; i++ {
		name := protocol.SerialPortName
		if i > 0 {
			name = protocol.ExecPortName(i)
		}
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=port%d,path=%s,server=on,wait=off", i, run(channelSock(i))),
			"-device", fmt.Sprintf("virtserialport,chardev=port%d,name=%s", i, name))
	}
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
			drive = fmt.Sprintf("id=%s,file=/dev/fdset/%d,file.locking=off,format=raw,if=none,cache=unsafe,discard=unmap", d.ID, set)
		}
		args = append(args, "-drive", drive,
			"-device", fmt.Sprintf("virtio-blk-device,drive=%s,serial=%s", d.ID, d.Serial))
	}
	return args
}

// netdev is the backend of the VM's interface: its tap, opened by name
// (QEMU opens it before -runas drops root; no vhost: /dev/vhost-net is
// not everywhere), or a hub port with nothing else on the hub, which
// drops what the guest sends.
func netdev(n vmm.Net) string {
	if n.Tap == "" {
		return "hubport,id=net0,hubid=0"
	}
	return "tap,id=net0,ifname=" + n.Tap + ",script=no,downscript=no,vhost=off"
}

// driveFiles opens the drives' files in the order args numbers them: one
// read-only descriptor per drive, and a read-write one after it for a
// writable drive.
func driveFiles(cfg vmm.Config) ([]*os.File, error) {
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
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// Start launches QEMU and returns once its QMP socket answers.
func (d *Driver) Start(ctx context.Context, cfg vmm.Config) (vmm.VM, error) {
	vm, err := d.launch(ctx, cfg, Args(cfg))
	if err != nil {
		return nil, err
	}
	if err := vm.checkRunning(); err != nil {
		return nil, vm.fail(err)
	}
	return vm, nil
}

// launch starts QEMU with args and connects to its QMP socket.
func (d *Driver) launch(ctx context.Context, cfg vmm.Config, args []string) (*VM, error) {
	bin := d.Binary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (install it with: apt-get install qemu-system-x86)", err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(cfg.RunDir, vmFile), b, 0o600); err != nil {
		return nil, err
	}
	console, err := net.Listen("unix", filepath.Join(cfg.RunDir, consoleSock))
	if err != nil {
		return nil, fmt.Errorf("console socket: %w", err)
	}
	vm := &VM{cfg: cfg, done: make(chan struct{}),
		console: &vmm.TailBuffer{Max: logTail}, output: &vmm.TailBuffer{Max: logTail}}
	consoleDone := make(chan struct{})
	go func() {
		defer close(consoleDone)
		vm.readConsole(console)
	}()
	if os.Geteuid() == 0 {
		if _, err := user.Lookup(unprivilegedUser); err == nil {
			args = append(args, "-runas", unprivilegedUser)
		}
	}
	files, err := driveFiles(cfg)
	if err != nil {
		console.Close()
		return nil, err
	}
	defer closeAll(files) // QEMU has its own copies once started
	cmd := exec.Command(path, args...)
	cmd.ExtraFiles = files
	cmd.Stdout, cmd.Stderr = vm.output, vm.output
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: a Ctrl-C at the terminal is for the
		// workload (hearth forwards it), not for QEMU.
		Setpgid: true,
		// If hearth dies without cleaning up, QEMU must not outlive it.
		// (-runas clears this; then the guest agent, seeing the channel
		// close, powers the VM off.)
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		console.Close()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	vm.cmd = cmd
	go func() {
		vm.waitErr = cmd.Wait()
		console.Close() // if QEMU failed before it connected
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
	return vm, nil
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
	console *vmm.TailBuffer // the guest's serial console
	output  *vmm.TailBuffer // QEMU's own stdout and stderr
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

func (v *VM) path(name string) string { return filepath.Join(v.cfg.RunDir, name) }

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

// Channel connects to the agent's virtio-serial chardev. QEMU created it
// before its QMP socket answered, so no retry is needed.
func (v *VM) Channel(ctx context.Context) (net.Conn, error) {
	return (&Driver{}).Dial(ctx, v.cfg.RunDir, 0)
}

// channelSock is the chardev socket of port i.
func channelSock(i int) string {
	if i == 0 {
		return agentSock
	}
	return fmt.Sprintf("exec%d.sock", i)
}

// Dial connects to port i of the VM whose run directory is runDir. Each
// port's chardev takes one connection at a time: the caller keeps exec
// ports apart.
func (d *Driver) Dial(ctx context.Context, runDir string, port int) (net.Conn, error) {
	if port < 0 || port > protocol.ExecPorts {
		return nil, fmt.Errorf("no channel port %d", port)
	}
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "unix", filepath.Join(runDir, channelSock(port)))
	if err != nil {
		return nil, fmt.Errorf("connect to guest agent channel %d: %w", port, err)
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

// Kill ends QEMU with SIGKILL and waits for it to be gone.
func (v *VM) Kill() error {
	v.once.Do(func() {
		if v.mon != nil {
			_ = v.mon.Disconnect()
		}
		select {
		case <-v.done:
		default:
			_ = v.cmd.Process.Kill()
		}
	})
	<-v.done
	return nil
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
