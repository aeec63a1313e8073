package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/sparse"
	"hearth.dev/hearth/internal/vmm"
)

// Runtime runs sandboxes on this host.
type Runtime struct {
	Images *image.Store
	Driver vmm.Driver
	Accel  vmm.Accel
	Kernel string // guest vmlinux
	// KernelArgs are appended to the guest kernel's command line
	// ($HEARTH_KERNEL_ARGS; "loglevel=7" shows the guest's boot messages
	// in the console log that boot errors quote).
	KernelArgs string
	Agent      string // hearth-agent binary
	CacheDir   string // where the initramfs is cached
	RunRoot    string // one directory per running VM under it
	// Reserve gives each VM's writable disk and memory file all their
	// blocks when they are made (fallocate): a guest that fills its disk
	// then cannot fill the filesystem under other VMs, and a VM that does
	// not fit fails at its start with ErrNoSpace, not later in the guest.
	// The node agent's VMs reserve; a local `hearth run` under /run (a
	// tmpfs, where a reservation is RAM) does not.
	Reserve   bool
	Pull      image.PullPolicy
	Log       *slog.Logger
	BootLimit time.Duration // from VMM start to the agent's hello, and again to the workload's start; 0 means 2 minutes
}

// IO connects a sandbox's streams to the caller.
type IO struct {
	Stdin   io.Reader // read only if Spec.Stdin
	Stdout  io.Writer
	Stderr  io.Writer
	Resize  <-chan protocol.Resize
	Signals <-chan syscall.Signal
	// Started, if set, is called once the workload runs: from then on
	// Signals reach it. Before, the caller's context is how to give up.
	Started func()
	// Running, if set, is called just before Started with the running
	// sandbox, for Exec and snapshots; it is valid until Run returns.
	Running func(*Running)
	// Prepared, if set, is called by RunIncoming once the image is here
	// and it waits for the source's stream (whose header it then reads
	// within 30 s).
	Prepared func()
	// HandedOver, if set, is called by RunIncoming once the source has
	// handed the sandbox over: from then on this VM is the sandbox's only
	// one (the source's is ended), and ending it loses the sandbox.
	HandedOver func()
}

// Result is how the workload ended.
type Result struct {
	ExitCode int
	Signal   int
	OOM      bool
	DiskFull bool
	// Error is set when the agent could not run the workload (bad user,
	// command not found...); ExitCode is then 125, 126 or 127.
	Error string
	// Boot is the time from starting the VMM to the workload running.
	Boot time.Duration
}

// ErrBoot means the VM did not come up to the point of running the workload.
var ErrBoot = errors.New("guest failed to boot")

// ErrStopped means the VM ended while the workload ran, without the agent
// reporting how the workload ended (a guest panic, the VMM dying).
var ErrStopped = errors.New("the VM stopped before the workload finished")

// memoryFile backs a booted VM's RAM in its run directory (Spec.Snapshottable).
const memoryFile = "memory"

// ErrNoSpace means the run root's filesystem has no room for a VM's
// writable disk or memory file (Runtime.Reserve).
var ErrNoSpace = errors.New("no room in the VM directory")

// ErrGuestProtocol means the guest sent what the protocol does not allow
// (the guest is the attacker's: its session ends, and its sandbox;
// nothing else does).
var ErrGuestProtocol = errors.New("the guest broke the protocol")

// Run boots a VM for spec, runs the workload to its end and removes the VM.
func (rt *Runtime) Run(ctx context.Context, spec Spec, sio IO) (res *Result, err error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	log := rt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t0 := time.Now()
	p, err := rt.prepare(ctx, spec, log)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, p.done()) }()
	img, id, runDir := p.img, p.id, p.runDir
	disk := filepath.Join(runDir, snapshotDisk)
	if spec.DiskFrom != "" {
		if err := sparse.Copy(spec.DiskFrom, disk); err != nil {
			return nil, fmt.Errorf("%w: writable disk: %v", vmm.ErrBadSnapshot, err)
		}
	} else if err := rt.makeDisk(ctx, disk, spec.DiskMiB); err != nil {
		return nil, err
	}
	cfg, err := rt.vmConfig(spec, p, disk)
	if err != nil {
		return nil, err
	}
	log.Debug("image and disk ready", "took", time.Since(t0))
	start := time.Now()
	vm, err := rt.Driver.Start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBoot, err)
	}
	defer func() {
		err = errors.Join(err, vm.Kill())
		log.Debug("vm ended", "since_vmm_start", time.Since(start))
	}()
	log.Debug("vm started", "id", id, "pid", vm.Pid(), "accel", rt.Accel, "took", time.Since(start))

	boot := bootOf(spec, img, id)
	limit := rt.BootLimit
	if limit == 0 {
		limit = 2 * time.Minute
	}
	conn, err := vm.Channel(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBoot, err)
	}
	res, err = serveBoot(ctx, vm, conn, boot, sio, limit, start, log, func(ch *channel) *Running {
		return &Running{ch: ch, driver: rt.Driver, vm: vm, cfg: cfg, runDir: runDir, boot: boot, image: spec.Image, digest: img.Digest, log: log}
	})
	if err != nil {
		return nil, err
	}
	// The workload has ended and its exit is known: nothing in the VM is
	// worth waiting for (the writable disk is discarded), so the deferred
	// Kill ends it now rather than after the guest's own reset.
	return res, nil
}

// bootOf is the workload's Boot for spec, from its image, in the VM id.
func bootOf(spec Spec, img *image.Image, id string) protocol.Boot {
	name := spec.Name
	if name == "" {
		name = "hearth-" + id
	}
	return protocol.Boot{
		Image:    protocol.Disk{Serial: "image", FSType: "erofs"},
		Writable: protocol.Disk{Serial: "rw", FSType: "ext4"},
		Hostname: name,
		Time:     time.Now().UnixNano(),
		Network:  spec.Network,
		Process: protocol.Process{
			Args:  argv(img.Config, spec.Entrypoint, spec.Command),
			Env:   mergeEnv(img.Config.Env, spec.Env),
			Dir:   firstNonEmpty(spec.WorkingDir, img.Config.WorkingDir),
			User:  firstNonEmpty(spec.User, img.Config.User),
			TTY:   spec.TTY,
			Rows:  spec.Rows,
			Cols:  spec.Cols,
			Stdin: spec.Stdin,
		},
	}
}

// prepared is what a sandbox's VM needs on this host before its VMM
// starts: its image, held until done, the initramfs, and a run directory,
// removed by done.
type prepared struct {
	img                *image.Image
	initrd, id, runDir string
	done               func() error
}

// prepare gets spec's image and a run directory for a new VM.
func (rt *Runtime) prepare(ctx context.Context, spec Spec, log *slog.Logger) (*prepared, error) {
	if _, err := os.Stat(rt.Kernel); err != nil {
		return nil, fmt.Errorf("no guest kernel at %s: build it with `make kernel` (kernel/build.sh)", rt.Kernel)
	}
	rt.sweep(log)
	img, err := rt.Images.Get(ctx, spec.Image, rt.Pull)
	if err != nil {
		return nil, err
	}
	release, err := rt.Images.Use(img.Digest)
	if err != nil {
		return nil, err
	}
	initrd, err := initramfs.Ensure(filepath.Join(rt.CacheDir, "initramfs"), rt.Agent)
	if err != nil {
		release()
		return nil, err
	}
	id := newID()
	runDir, remove, err := rt.makeRunDir(id)
	if err != nil {
		release()
		return nil, err
	}
	return &prepared{img: img, initrd: initrd, id: id, runDir: runDir, done: func() error {
		defer release()
		return remove()
	}}, nil
}

// vmConfig is the VM of spec in p's run directory with the writable disk
// disk, which it reserves (and the memory file of a snapshottable one):
// a booted sandbox's and a migrated one's are the same machine, drive
// for drive, as a migration needs.
func (rt *Runtime) vmConfig(spec Spec, p *prepared, disk string) (vmm.Config, error) {
	var memFile string
	if spec.Snapshottable {
		memFile = filepath.Join(p.runDir, memoryFile)
	}
	if err := rt.reserve(disk, memFile, spec.MemoryMiB); err != nil {
		return vmm.Config{}, err
	}
	return vmm.Config{
		MemoryFile: memFile,
		Channel:    protocol.ChannelName,
		ID:         p.id,
		RunDir:     p.runDir,
		Kernel:     rt.Kernel,
		Initrd:     p.initrd,
		Cmdline:    rt.KernelArgs,
		VCPUs:      spec.CPUs,
		MemoryMiB:  spec.MemoryMiB,
		Accel:      rt.Accel,
		Net:        vmm.Net{Tap: spec.Tap},
		Drives: []vmm.Drive{
			{ID: "image", Path: p.img.RootFS, ReadOnly: true, Serial: "image"},
			{ID: rwDrive, Path: disk, Serial: "rw"},
		},
	}, nil
}

// guestVM is what the workload's session needs of its VM: its end, and
// its last words for errors.
type guestVM interface {
	Wait(ctx context.Context) error
	Logs(n int) string
}

// serveBoot runs the workload's session over conn, the channel of vm:
// Hello and Boot, the guest's Hello within limit, then the workload to
// its end within limit of its start. running makes the Running that
// sio.Running is given.
func serveBoot(ctx context.Context, vm guestVM, conn net.Conn, boot protocol.Boot, sio IO, limit time.Duration,
	start time.Time, log *slog.Logger, running func(*channel) *Running) (*Result, error) {
	ch := newChannel(conn, 1, log)
	defer ch.close()
	s := &session{proc: boot.Process, sio: sio, start: start, log: log, vm: vm, vmDone: watch(ctx, vm, ch)}
	// Hello and Boot go out together, before the guest has booted: the
	// agent reads Boot as soon as it has answered Hello, with no round
	// trip between them. A guest of another protocol version answers
	// Hello with its own version and ignores Boot.
	if err := ch.hello(); err != nil {
		return nil, s.bootError(err.Error())
	}
	var err error
	if s.st, err = ch.open(protocol.TBoot, boot, sinks{sio.Stdout, sio.Stderr}); err != nil {
		return nil, s.bootError(err.Error())
	}
	r, err := ch.awaitHello(limit)
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case errors.Is(err, errChannelClosed):
		return nil, s.bootError(err.Error())
	case err != nil:
		return nil, err
	}
	go ch.loop(r)
	log.Debug("guest agent answered", "since_vmm_start", time.Since(start))
	rn := running(ch)
	s.sio.Started = func() {
		if sio.Running != nil {
			sio.Running(rn)
		}
		if sio.Started != nil {
			sio.Started()
		}
	}
	// The workload starts (or fails to) within the same limit.
	return s.serve(ctx, limit)
}

// watch closes the channel shortly after the VM ends (QEMU closes its
// end as it exits; this is in case it does not), and returns a channel
// closed at the VM's end.
func watch(ctx context.Context, vm guestVM, ch *channel) <-chan struct{} {
	vmDone := make(chan struct{})
	go func() {
		if vm.Wait(ctx) != nil && ctx.Err() != nil {
			return // the caller gave up first
		}
		close(vmDone)
		// Let buffered frames drain before ending the channel.
		time.AfterFunc(200*time.Millisecond, ch.close)
	}()
	return vmDone
}

func firstNonEmpty(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func newID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// makeRunDir creates the VM's run directory and holds a lock in it for the
// life of this process, so that sweep can tell abandoned directories (their
// owner was SIGKILLed) from live ones. The lock file is locked before it
// takes its name, so that sweep never sees it unlocked while its owner lives.
// remove gives the lock up and removes the directory.
func (rt *Runtime) makeRunDir(id string) (dir string, remove func() error, err error) {
	dir = filepath.Join(rt.RunRoot, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, fmt.Errorf("run directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock.new"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return "", nil, err
	}
	if err := os.Rename(filepath.Join(dir, "lock.new"), filepath.Join(dir, "lock")); err != nil {
		f.Close()
		return "", nil, err
	}
	return dir, func() error {
		f.Close()
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove run directory: %w", err)
		}
		return nil
	}, nil
}

// sweep removes what owners that died without cleaning up left under the
// run root: Sweep.
func (rt *Runtime) sweep(log *slog.Logger) { Sweep(rt.RunRoot, log) }

// Sweep ends the jailed VMMs under runRoot whose owner is gone (the
// parent-death signal normally got there first) and removes the run
// directories of dead owners: their lock is free, or they never got one
// and are older than a minute.
func Sweep(runRoot string, log *slog.Logger) {
	killed, err := jail.Sweep(runRoot, runAlive)
	for _, dir := range killed {
		log.Warn("killed a VMM whose owner is gone", "dir", dir)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) && os.Geteuid() == 0 {
		log.Warn("sweep VMM cgroups", "err", err)
	}
	entries, _ := os.ReadDir(runRoot)
	for _, e := range entries {
		dir := filepath.Join(runRoot, e.Name())
		if _, err := os.Stat(filepath.Join(dir, "lock")); err != nil {
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Minute {
				log.Info("removing abandoned run directory", "dir", dir)
				_ = os.RemoveAll(dir)
			}
			continue
		}
		if !runAlive(dir) {
			log.Info("removing abandoned run directory", "dir", dir)
			_ = os.RemoveAll(dir)
		}
	}
}

// runAlive reports whether the owner of the run directory dir holds its
// lock (makeRunDir). A directory without a lock file is not alive.
func runAlive(dir string) bool {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return true
	}
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// makeDisk creates the sandbox's writable layer as MakeDisk formats it,
// by copying a disk of that size that MakeDisk formatted once into the
// cache: copying its few hundred KiB of metadata (the rest is holes) takes
// well under a millisecond, running mkfs.ext4 about 10 ms of each run.
// Every sandbox's disk then has the same filesystem UUID and directory
// hash seed, which nothing uses; the guest sees only its own.
func (rt *Runtime) makeDisk(ctx context.Context, path string, sizeMiB int) error {
	if rt.CacheDir == "" {
		return MakeDisk(ctx, path, sizeMiB)
	}
	dir := filepath.Join(rt.CacheDir, "disks")
	// The name changes with what MakeDisk makes.
	sum := sha256.Sum256([]byte(strings.Join(append(append(mkfsArgs(), diskDirs...), diskFormat), " ")))
	template := filepath.Join(dir, fmt.Sprintf("ext4-%dM-%x", sizeMiB, sum[:6]))
	if _, err := os.Stat(template); err != nil {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("writable disk: %w", err)
		}
		tmp := template + ".new-" + newID()
		if err := MakeDisk(ctx, tmp, sizeMiB); err != nil {
			os.Remove(tmp)
			return err
		}
		if err := os.Rename(tmp, template); err != nil {
			os.Remove(tmp)
			return fmt.Errorf("writable disk: %w", err)
		}
	}
	if err := sparse.Copy(template, path); err != nil {
		return fmt.Errorf("writable disk: %w", err)
	}
	return nil
}

// reserve gives the disk, and the memory file of memMiB if there is one,
// their blocks, when rt.Reserve. On a filesystem without fallocate they
// stay sparse.
func (rt *Runtime) reserve(disk, memFile string, memMiB int) error {
	if !rt.Reserve {
		return nil
	}
	fi, err := os.Stat(disk)
	if err != nil {
		return err
	}
	if err := allocate(disk, fi.Size(), false); err != nil {
		return err
	}
	if memFile != "" {
		return allocate(memFile, int64(memMiB)<<20, true)
	}
	return nil
}

// DiskUsage is what the VMs under runRoot hold on its filesystem: their
// writable disks and memory files (whole, where Reserve allocated them),
// each counted up to its size.
func DiskUsage(runRoot string) int64 {
	var n int64
	for _, name := range []string{snapshotDisk, memoryFile} {
		files, _ := filepath.Glob(filepath.Join(runRoot, "*", name))
		for _, f := range files {
			var st unix.Stat_t
			if unix.Lstat(f, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
				n += min(st.Blocks*512, st.Size)
			}
		}
	}
	return n
}

// allocate gives path (created, if create) size bytes of blocks.
func allocate(path string, size int64, create bool) error {
	flags := os.O_WRONLY | unix.O_NOFOLLOW
	if create {
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	switch err := unix.Fallocate(int(f.Fd()), 0, 0, size); {
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		var fs unix.Statfs_t
		_ = unix.Fstatfs(int(f.Fd()), &fs)
		return fmt.Errorf("%w: %s needs %d MiB, %s has %d MiB free", ErrNoSpace, filepath.Base(path), size>>20,
			filepath.Dir(filepath.Dir(path)), int64(fs.Bavail)*fs.Bsize>>20)
	case errors.Is(err, unix.EOPNOTSUPP):
		return nil
	case err != nil:
		return fmt.Errorf("reserve %s: %w", filepath.Base(path), err)
	}
	return nil
}

// diskFormat names what else MakeDisk does (upper/tmp's mode): change it
// when that changes, so that templates in caches are made again.
const diskFormat = "1"

// diskDirs are the directories MakeDisk makes on the writable disk.
var diskDirs = []string{"upper/dev", "upper/proc", "upper/sys", "upper/tmp", "work"}

// mkfsArgs are mkfs.ext4's options for the writable disk (see MakeDisk).
func mkfsArgs() []string {
	return []string{"-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"}
}

// MakeDisk creates the sandbox's writable layer: a sparse file formatted
// ext4. No reserved blocks (the workload may use it all), no journal (it
// lives as long as the VM), and lazy inode tables: the guest mounts it with
// noinit_itable, and the sparse file reads back zeros anyway. The overlay's
// upper and work directories, and the mount points the agent needs, are
// made here by mkfs -d: creating them in the guest costs tens of
// milliseconds of emulated ext4 work under TCG.
func MakeDisk(ctx context.Context, path string, sizeMiB int) error {
	skel := path + ".skel"
	defer os.RemoveAll(skel)
	for _, d := range diskDirs {
		if err := os.MkdirAll(filepath.Join(skel, d), 0o755); err != nil {
			return fmt.Errorf("writable disk: %w", err)
		}
	}
	if err := os.Chmod(filepath.Join(skel, "upper/tmp"), 0o1777|os.ModeSticky); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writable disk: %w", err)
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", append(mkfsArgs(), "-d", skel, path)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// session serves one process's session on a VM's channel: the workload's
// (Run, RunSnapshot) or an exec's (Running.Exec).
type session struct {
	st    *stream
	proc  protocol.Process
	sio   IO
	start time.Time
	log   *slog.Logger
	// vm and vmDone are the workload's VM and its end, for the errors of
	// a VM that stops; nil for an exec.
	vm     guestVM
	vmDone <-chan struct{}
}

// vmError is err with what the VM said last: a guest kernel panic line
// first, then the tails of the VMM's and the console's output.
func (s *session) vmError(err error, msg string) error {
	logs := ""
	if s.vm != nil {
		logs = s.vm.Logs(2048)
	}
	if i := strings.Index(logs, "Kernel panic"); i >= 0 {
		line := logs[i:]
		if j := strings.IndexByte(line, '\n'); j >= 0 {
			line = line[:j]
		}
		msg = strings.TrimPrefix(msg+": the guest kernel panicked: "+line, ": ")
	}
	if msg != "" {
		err = fmt.Errorf("%w: %s", err, msg)
	}
	if logs != "" {
		return fmt.Errorf("%w\n%s", err, logs)
	}
	return err
}

func (s *session) bootError(msg string) error { return s.vmError(ErrBoot, msg) }

// serve waits for the session's process to start, within startLimit (the
// guest that answers and then says nothing does not hold its caller), and
// then to end, forwarding stdin, window sizes and signals while it runs.
func (s *session) serve(ctx context.Context, startLimit time.Duration) (*Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res := &Result{}
	started := s.st.started
	timer := time.NewTimer(startLimit)
	defer timer.Stop()
	for {
		select {
		case <-started:
			started = nil
			timer.Stop()
			res.Boot = time.Since(s.start)
			s.log.Debug("process started", "since_vmm_start", res.Boot, "session", s.st.id)
			if s.sio.Started != nil {
				s.sio.Started()
			}
			go s.forward(ctx)
		case <-s.st.ended:
			return s.ended(res)
		case <-ctx.Done():
			s.st.close()
			return nil, ctx.Err()
		case <-timer.C:
			if started == nil {
				continue
			}
			s.st.close()
			return nil, fmt.Errorf("%w: the guest agent did not start the process within %s", ErrGuestProtocol, startLimit)
		}
	}
}

// ended is the session's result once its stream has ended.
func (s *session) ended(res *Result) (*Result, error) {
	e, err := s.st.result()
	if errors.Is(err, ErrMigrated) {
		return nil, err
	}
	if err != nil {
		if errors.Is(err, errChannelClosed) && s.vmDone != nil {
			// QEMU closes the channel as it exits: give the exit a moment
			// to be seen, so that the error carries the VM's last words.
			select {
			case <-s.vmDone:
				if res.Boot == 0 {
					return nil, s.bootError("the VM stopped before the workload started")
				}
				return nil, s.vmError(ErrStopped, "")
			case <-time.After(time.Second):
			}
		}
		var oe *OutputError
		if errors.Is(err, ErrGuestProtocol) || errors.As(err, &oe) {
			return nil, err
		}
		return nil, fmt.Errorf("guest agent channel: %w", err)
	}
	// Bye: the guest may power off (the workload's) or forget the session.
	_ = s.st.send(protocol.TBye, nil)
	s.log.Debug("process exited", "since_vmm_start", time.Since(s.start), "code", e.Code, "session", s.st.id)
	res.ExitCode, res.Signal, res.OOM, res.DiskFull, res.Error = e.Code, e.Signal, e.OOM, e.DiskFull, e.Error
	if res.Boot == 0 {
		res.Boot = time.Since(s.start)
	}
	return res, nil
}

// forward sends stdin, window sizes and signals to the guest.
func (s *session) forward(ctx context.Context) {
	if s.proc.Stdin && s.sio.Stdin != nil {
		go s.pumpStdin()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case r, ok := <-s.sio.Resize:
			if !ok {
				s.sio.Resize = nil
				continue
			}
			_ = s.st.sendJSON(protocol.TResize, r)
		case sig, ok := <-s.sio.Signals:
			if !ok {
				s.sio.Signals = nil
				continue
			}
			_ = s.st.sendJSON(protocol.TSignal, protocol.Signal{Signal: int(sig)})
		}
	}
}

func (s *session) pumpStdin() {
	buf := make([]byte, protocol.ChunkSize)
	for {
		n, err := s.sio.Stdin.Read(buf)
		p := buf[:n]
		for len(p) > 0 {
			k := s.st.stdin.take(len(p))
			if k == 0 {
				return // session over
			}
			if s.st.send(protocol.TStdin, p[:k]) != nil {
				return
			}
			p = p[k:]
		}
		if err != nil {
			_ = s.st.send(protocol.TStdinClose, nil)
			return
		}
	}
}

// credit is the host's stdin send window: n bytes may be sent, inFlight
// were sent and not acknowledged; n + inFlight is the window, whatever the
// guest acknowledges.
type credit struct {
	mu       sync.Mutex
	cond     *sync.Cond
	n        int
	inFlight int
	closed   bool
}

func newCredit(n int) *credit {
	c := &credit{n: n}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// take waits for credit and returns up to want bytes of it; 0 once closed.
func (c *credit) take(want int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.n == 0 && !c.closed {
		c.cond.Wait()
	}
	if c.closed {
		return 0
	}
	k := min(want, c.n)
	c.n -= k
	c.inFlight += k
	return k
}

// add takes the guest's acknowledgement of n bytes: more than 0 and no more
// than are in flight, else it is a protocol error (a negative count once
// made take return a negative length, and the host panicked).
func (c *credit) add(n int) error {
	c.mu.Lock()
	defer c.cond.Broadcast()
	defer c.mu.Unlock()
	if n <= 0 || n > c.inFlight {
		return fmt.Errorf("%w: stdin acknowledged %d bytes with %d in flight", ErrGuestProtocol, n, c.inFlight)
	}
	c.inFlight -= n
	c.n += n
	return nil
}

func (c *credit) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cond.Broadcast()
}
