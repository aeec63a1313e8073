package agent

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/guest/protocol"
)

// Exit codes the agent reports when the workload could not run, as docker's.
const (
	exitHearth       = 125
	exitCannotInvoke = 126
	exitNotFound     = 127
)

// Main runs the agent. It never returns normally: it ends by rebooting the
// VM, which the VMM turns into an exit (-no-reboot / Firecracker's reset).
func Main(build string) {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "hearth-agent: must run as PID 1 inside a hearth guest")
		os.Exit(2)
	}
	if os.Getenv(protocol.PowerOffEnv) == "1" {
		powerOff()
	}
	err := run(build)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hearth-agent: %v\n", err)
	}
	powerOff()
}

// powerOff ends the VM. There is nothing to sync: the writable disk is
// discarded with the VM. (Snapshots, when hearth has them, must quiesce the
// disk before they are taken.)
func powerOff() {
	// With reboot=t and the VMM's -no-reboot, a restart ends the VM at once;
	// a halt would leave QEMU running with a stopped CPU.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}

func run(build string) error {
	// PID 1 gets only the signals it handles. Handle (and drop) the ones a
	// workload might send it, so that `kill 1` does not end the agent and
	// with it the VM ("Attempted to kill init"). Handled, not ignored:
	// ignored dispositions would be inherited by the workload across exec.
	drop := make(chan os.Signal, 8)
	signal.Notify(drop, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1,
		unix.SIGUSR2, unix.SIGPIPE, unix.SIGALRM, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU)
	go func() {
		for range drop {
		}
	}()
	if err := mountEarly(); err != nil {
		return err
	}
	go reap.run()
	if err := loopbackUp(); err != nil {
		fmt.Fprintf(os.Stderr, "hearth-agent: bring up lo: %v\n", err)
	}
	// The workload may be OOM-killed; the agent must not be, and is not:
	// the kernel never picks init (oom_unkillable_task). Its
	// oom_score_adj stays at the default, which the workload inherits.

	port, err := openPort(protocol.SerialPortName, 10*time.Second, 2*time.Millisecond)
	if err != nil {
		return err
	}
	s := &session{r: protocol.NewReader(port), w: protocol.NewWriter(port), port: port, build: build}
	return s.serve(false)
}

func mountEarly() error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"devtmpfs", "/dev", "devtmpfs"},
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	// The initramfs has no /dev/console node (the cpio writer makes no
	// device nodes), so the kernel started us without stdio: take the
	// console from devtmpfs now, so that errors reach the console log.
	if fd, err := unix.Open("/dev/console", unix.O_RDWR, 0); err == nil {
		for i := 0; i < 3; i++ {
			_ = unix.Dup3(fd, i, 0)
		}
		if fd > 2 {
			unix.Close(fd)
		}
	}
	return nil
}

// openPort finds the virtio-serial port called name and waits until the
// host end is connected (checking every interval): before that, reads
// return EOF at once. A zero timeout waits for ever.
func openPort(name string, timeout, interval time.Duration) (*os.File, error) {
	if timeout == 0 {
		timeout = 100 * 365 * 24 * time.Hour
	}
	deadline := time.Now().Add(timeout)
	for {
		if dev := portDevice(name); dev != "" {
			f, err := os.OpenFile(dev, os.O_RDWR, 0)
			if err != nil {
				return nil, err
			}
			if err := waitHost(f, deadline, interval); err != nil {
				f.Close()
				return nil, err
			}
			return f, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no virtio-serial port named %s", name)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

const virtioPorts = "/sys/class/virtio-ports/"

// portDevice returns the device of the virtio-serial port called name, ""
// while there is none. QEMU numbers ports from 1 in the order of its command
// line, which has hearth.0 to hearth.N in order (internal/vmm/qemu), and the
// guest names them vport0pID: that one is checked first, and the others are
// only scanned (fewer sysfs reads and less first-run code under TCG) if it
// is not the one.
func portDevice(name string) string {
	if n, ok := strings.CutPrefix(name, "hearth."); ok {
		if i, err := strconv.Atoi(n); err == nil {
			dev := "vport0p" + strconv.Itoa(i+1)
			if portName(dev) == name {
				return "/dev/" + dev
			}
		}
	}
	entries, _ := os.ReadDir(virtioPorts)
	for _, e := range entries {
		if portName(e.Name()) == name {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

func portName(dev string) string {
	b, err := os.ReadFile(virtioPorts + dev + "/name")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// waitHost waits until a host is connected to the port and has sent
// something. Until the host connects, the port polls readable with
// POLLHUP and reads return EOF, so poll cannot wait for it. The port is
// put in O_ASYNC mode instead: virtio_console sends SIGIO when the host
// connects or data arrives, which wakes every waiting port to look again;
// interval is only a fallback. (Polling every exec port every 20 ms cost an
// idle guest under TCG several percent of a host CPU.)
func waitHost(f *os.File, deadline time.Time, interval time.Duration) error {
	fd := int(f.Fd())
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil && fl&unix.O_ASYNC == 0 {
		_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETOWN, os.Getpid())
		_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_ASYNC)
	}
	for {
		woken := hostEvents.next()
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 0); err == nil && fds[0].Revents&unix.POLLIN != 0 && fds[0].Revents&unix.POLLHUP == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("host never connected to the agent port")
		}
		select {
		case <-woken:
		case <-time.After(min(interval, time.Until(deadline)+time.Millisecond)):
		}
	}
}

// hostEvents broadcasts each SIGIO to the ports waiting for their host.
var hostEvents = newBroadcast(unix.SIGIO)

type broadcast struct {
	mu sync.Mutex
	ch chan struct{}
}

func newBroadcast(sig os.Signal) *broadcast {
	b := &broadcast{ch: make(chan struct{})}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, sig)
	go func() {
		for range sigs {
			b.mu.Lock()
			close(b.ch)
			b.ch = make(chan struct{})
			b.mu.Unlock()
		}
	}()
	return b
}

// next is closed at the next signal.
func (b *broadcast) next() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ch
}

// session is one conversation with the host: handshake, start, streams, exit.
type session struct {
	build string
	r     *protocol.Reader
	w     *protocol.Writer
	port  *os.File
	bye   chan struct{} // closed when the host said Bye or went away

	hostGone atomic.Bool // the host's end of the channel closed

	mu sync.Mutex
	wl *running // the workload, once it runs
}

// running is what the control loop acts on while the workload runs.
type running struct {
	pid   int
	ptmx  *os.File // nil without a TTY
	stdin *stdinWriter
}

// serve runs the session: the workload's (on the first port), or an exec
// session's (exec true).
func (s *session) serve(exec bool) error {
	f, err := s.r.Read()
	if err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	var hello protocol.Hello
	if f.Type != protocol.THello {
		return fmt.Errorf("expected hello, got %s", f.Type)
	}
	if err := protocol.Decode(f, &hello); err != nil {
		return err
	}
	if err := s.w.WriteJSON(protocol.THello, protocol.Hello{Version: protocol.Version, Agent: s.build}); err != nil {
		return err
	}
	if hello.Version != protocol.Version {
		return fmt.Errorf("host speaks protocol %d, agent %d", hello.Version, protocol.Version)
	}
	f, err = s.r.Read()
	if err != nil {
		return fmt.Errorf("read start: %w", err)
	}
	if f.Type != protocol.TStart {
		return fmt.Errorf("expected start, got %s", f.Type)
	}
	var st protocol.Start
	if err := protocol.Decode(f, &st); err != nil {
		return err
	}
	if st.Exec != exec {
		return fmt.Errorf("start with exec=%v on a port for exec=%v", st.Exec, exec)
	}
	if hostile(s, &st) { // only in a test build (-tags hostile)
		return errors.New("a hostile scenario ran")
	}
	// From here on one goroutine reads the host's frames.
	s.bye = make(chan struct{})
	go s.control()
	exit := s.runWorkload(&st)
	if s.hostGone.Load() {
		// Nobody to report to (hearth died): power off now. Writes to a
		// port whose host end is closed wait for a host that never comes.
		// (For an exec session: end the session.)
		return errors.New("the host went away")
	}
	sent := make(chan error, 1)
	go func() { sent <- s.w.WriteJSON(protocol.TExit, exit) }()
	// Wait for the host's Bye so that the exit report is out of the
	// virtqueue before the VM resets (the host usually ends the VM first).
	select {
	case <-s.bye:
	case <-time.After(5 * time.Second):
	}
	select {
	case err := <-sent:
		return err
	default:
		return errors.New("the host did not take the exit report; powering off")
	}
}

func failure(code int, format string, args ...any) protocol.Exit {
	return protocol.Exit{Code: code, Error: fmt.Sprintf(format, args...)}
}

func (s *session) runWorkload(st *protocol.Start) protocol.Exit {
	if st.Control != "" {
		if err := control(st); err != nil {
			return failure(exitHearth, "%s: %v", st.Control, err)
		}
		return protocol.Exit{}
	}
	if !st.Exec {
		if st.Time != 0 {
			tv := unix.NsecToTimeval(st.Time)
			_ = unix.Settimeofday(&tv)
		}
		if err := setupRoot(st); err != nil {
			return failure(exitHearth, "set up root filesystem: %v", err)
		}
		if st.Network != nil {
			if err := setupNetwork(st.Network, st.Hostname); err != nil {
				return failure(exitHearth, "set up the network: %v", err)
			}
		}
	}
	if len(st.Args) == 0 {
		return failure(exitHearth, "no command: the image has no Entrypoint or Cmd and none was given")
	}
	id, err := resolveUser(st.User)
	if err != nil {
		return failure(exitHearth, "%v", err)
	}
	env := completeEnv(st.Env, st.Hostname, id.Home, st.TTY)
	dir := st.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return failure(exitHearth, "working directory %s: %v", dir, err)
	}
	path, err := lookPath(st.Args[0], getenv(env, "PATH"), dir)
	if err != nil {
		code := exitNotFound
		if errors.Is(err, errNotExecutable) {
			code = exitCannotInvoke
		}
		return failure(code, "exec %q: %v", st.Args[0], err)
	}

	// Not exec.Command: it would look the name up again, in the agent's
	// PATH. A relative Path is taken relative to Dir, as lookPath did.
	cmd := &exec.Cmd{Path: path, Args: st.Args, Env: env, Dir: dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: id.UID, Gid: id.GID, Groups: id.Groups},
	}
	oomBefore := oomKills()

	wio, err := startIO(cmd, st)
	if err != nil {
		return failure(exitHearth, "%v", err)
	}
	if err := cmd.Start(); err != nil {
		wio.closeChild()
		code := exitCannotInvoke
		if errors.Is(err, unix.ENOENT) {
			code = exitNotFound
		}
		return failure(code, "exec %q: %v", st.Args[0], err)
	}
	wio.closeChild()
	pid := cmd.Process.Pid

	wl := &running{pid: pid, ptmx: wio.pty, stdin: newStdinWriter(wio.stdin, s.w)}
	s.mu.Lock()
	s.wl = wl
	s.mu.Unlock()
	defer wl.stdin.close()
	// Only now: the host starts sending stdin when it sees Started, and
	// the control loop must have somewhere to put it.
	exited := reap.wait(pid)
	_ = s.w.WriteJSON(protocol.TStarted, protocol.Started{Pid: pid})
	if !st.Exec && !st.NoExecPorts {
		// The sandbox runs: from now on, exec sessions may come.
		startExecPorts.Do(func() {
			for i := 1; i <= protocol.ExecPorts; i++ {
				go s.execLoop(i)
			}
		})
	}

	var pumps sync.WaitGroup
	for _, p := range wio.outputs {
		pumps.Add(1)
		go func() {
			defer pumps.Done()
			s.pump(p.t, p.f)
		}()
	}

	status := <-exited
	if !st.Exec {
		// Like the end of a container's PID namespace: whatever the
		// workload left behind (exec sessions too) dies with it, so that
		// its copies of stdout and stderr close.
		_ = unix.Kill(-1, unix.SIGKILL)
		reapAll()
	}
	waitTimeout(&pumps, 2*time.Second)

	exit := protocol.Exit{Code: status.ExitStatus()}
	if status.Signaled() {
		exit.Signal = int(status.Signal())
		exit.Code = 128 + exit.Signal
	}
	exit.OOM = oomKills() > oomBefore
	exit.DiskFull = diskFull("/")
	return exit
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

var startExecPorts sync.Once

// execLoop serves exec sessions on exec port i, one after another, for the
// life of the sandbox. The port stays open between sessions: closing and
// reopening it makes the guest announce the port to QEMU each time, and
// a close can be held off by a read still blocked in it (then the reopen
// fails with EBUSY). Sessions are told apart by the protocol alone (Hello
// ... Bye, read exactly: NewExactReader).
func (s *session) execLoop(i int) {
	name := protocol.ExecPortName(i)
	// A host's connection wakes the port at once (waitHost); the poll is
	// a fallback.
	const poll = time.Second
	port, err := openPort(name, 0, poll)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hearth-agent: exec port %s: %v\n", name, err)
		return
	}
	forever := time.Now().Add(100 * 365 * 24 * time.Hour)
	for {
		es := &session{r: protocol.NewExactReader(port), w: protocol.NewWriter(port), port: port, build: s.build}
		if err := es.serve(true); err != nil {
			fmt.Fprintf(os.Stderr, "hearth-agent: exec session on %s: %v\n", name, err)
		}
		if es.bye != nil {
			// The session's reader ends with its Bye, or when its host
			// goes: the next session must not share the port with it.
			<-es.bye
		}
		_ = waitHost(port, forever, poll)
	}
}

// reap is PID 1's reaper: one goroutine collects every child that exits
// (orphans are re-parented to PID 1), and hands each status to whoever
// waits for that pid (the workload's session, or an exec session's).
var reap = &reaper{waiting: map[int]chan unix.WaitStatus{}, exited: map[int]unix.WaitStatus{}}

type reaper struct {
	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus
	exited  map[int]unix.WaitStatus // reaped before anyone asked
}

func (r *reaper) run() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD)
	for {
		for {
			var ws unix.WaitStatus
			p, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || p <= 0 {
				break
			}
			r.mu.Lock()
			if ch, ok := r.waiting[p]; ok {
				ch <- ws
				delete(r.waiting, p)
			} else {
				if len(r.exited) > 4096 { // orphans nobody waits for
					clear(r.exited)
				}
				r.exited[p] = ws
			}
			r.mu.Unlock()
		}
		<-sigs
	}
}

// wait returns where pid's exit status will be sent.
func (r *reaper) wait(pid int) <-chan unix.WaitStatus {
	ch := make(chan unix.WaitStatus, 1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if ws, ok := r.exited[pid]; ok {
		delete(r.exited, pid)
		ch <- ws
		return ch
	}
	r.waiting[pid] = ch
	return ch
}

func reapAll() {
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		var ws unix.WaitStatus
		p, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
		if p <= 0 {
			time.Sleep(time.Millisecond)
		}
	}
}

func (s *session) pump(t protocol.Type, f *os.File) {
	defer f.Close()
	buf := make([]byte, protocol.ChunkSize)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if s.w.Write(t, buf[:n]) != nil {
				return
			}
		}
		if err != nil { // EOF, or EIO from a pty master whose slave closed
			return
		}
	}
}

// control reads the host's frames until Bye: stdin, window sizes and
// signals for the workload once it runs.
func (s *session) control() {
	defer close(s.bye)
	current := func() *running {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.wl
	}
	for {
		f, err := s.r.Read()
		if err != nil {
			// The host went away: nobody will read the output. End the
			// workload so that the VM powers off instead of lingering
			// (QEMU runs as another user than hearth, so it does not die
			// with hearth: this is how an orphaned VM ends itself).
			s.hostGone.Store(true)
			if wl := current(); wl != nil {
				_ = unix.Kill(wl.pid, unix.SIGKILL)
			}
			return
		}
		if f.Type == protocol.TBye {
			return
		}
		wl := current()
		if wl == nil {
			continue // the host sends nothing else before Started
		}
		switch f.Type {
		case protocol.TStdin:
			wl.stdin.write(f.Payload)
		case protocol.TStdinClose:
			wl.stdin.close()
		case protocol.TResize:
			var r protocol.Resize
			if protocol.Decode(f, &r) == nil && wl.ptmx != nil {
				_ = pty.Setsize(wl.ptmx, &pty.Winsize{Rows: r.Rows, Cols: r.Cols})
			}
		case protocol.TSignal:
			var sg protocol.Signal
			if protocol.Decode(f, &sg) == nil && sg.Signal > 0 && sg.Signal < 65 {
				_ = unix.Kill(wl.pid, unix.Signal(sg.Signal))
			}
		}
	}
}

type output struct {
	t protocol.Type
	f *os.File
}

// workloadIO is the agent's side of the workload's stdio.
type workloadIO struct {
	stdin   *os.File // where host stdin goes; nil when not forwarded
	pty     *os.File // the pty master, with a TTY
	outputs []output
	child   []*os.File // the workload's ends, closed in the agent after start
}

func (w *workloadIO) closeChild() {
	for _, f := range w.child {
		f.Close()
	}
}

func startIO(cmd *exec.Cmd, st *protocol.Start) (*workloadIO, error) {
	w := &workloadIO{}
	if st.TTY {
		ptmx, tty, err := pty.Open()
		if err != nil {
			return nil, fmt.Errorf("open pty: %w", err)
		}
		if st.Rows > 0 && st.Cols > 0 {
			_ = pty.Setsize(ptmx, &pty.Winsize{Rows: st.Rows, Cols: st.Cols})
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
		w.pty = ptmx
		if st.Stdin {
			// The master is read by the output pump and written by the
			// stdin writer: separate descriptors keep their closes apart.
			in, err := dupFile(ptmx)
			if err != nil {
				return nil, err
			}
			w.stdin = in
		}
		w.outputs = []output{{protocol.TStdout, ptmx}}
		w.child = []*os.File{tty}
		return w, nil
	}
	if st.Stdin {
		r, wr, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		cmd.Stdin, w.stdin = r, wr
		w.child = append(w.child, r)
	} else {
		null, err := os.Open(os.DevNull)
		if err != nil {
			return nil, err
		}
		cmd.Stdin = null
		w.child = append(w.child, null)
	}
	for _, t := range []protocol.Type{protocol.TStdout, protocol.TStderr} {
		r, wr, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		if t == protocol.TStdout {
			cmd.Stdout = wr
		} else {
			cmd.Stderr = wr
		}
		w.outputs = append(w.outputs, output{t, r})
		w.child = append(w.child, wr)
	}
	return w, nil
}

func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// stdinWriter feeds host stdin to the workload from its own goroutine, so
// that a workload that does not read its stdin never blocks the control loop,
// and returns window credit to the host as bytes are consumed. The host never
// has more than protocol.StdinWindow bytes outstanding, which bounds the queue.
type stdinWriter struct {
	mu     sync.Mutex
	cond   *sync.Cond
	q      [][]byte
	closed bool
}

func newStdinWriter(f *os.File, w *protocol.Writer) *stdinWriter {
	s := &stdinWriter{}
	s.cond = sync.NewCond(&s.mu)
	go func() {
		for {
			s.mu.Lock()
			for len(s.q) == 0 && !s.closed {
				s.cond.Wait()
			}
			if len(s.q) == 0 {
				s.mu.Unlock()
				break
			}
			b := s.q[0]
			s.q = s.q[1:]
			s.mu.Unlock()
			if f != nil {
				if _, err := f.Write(b); err != nil {
					f.Close()
					f = nil // the workload closed its stdin: drop the rest
				}
			}
			_ = w.WriteJSON(protocol.TStdinAck, protocol.StdinAck{Bytes: len(b)})
		}
		if f != nil {
			f.Close()
		}
	}()
	return s
}

func (s *stdinWriter) write(p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.q = append(s.q, append([]byte(nil), p...))
		s.cond.Signal()
	}
}

func (s *stdinWriter) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.cond.Signal()
}

// oomKills reads the kernel's count of OOM kills since boot.
func oomKills() int {
	b, err := os.ReadFile("/proc/vmstat")
	if err != nil {
		return 0
	}
	_, v, ok := strings.Cut(string(b), "\noom_kill ")
	if !ok {
		return 0
	}
	v, _, _ = strings.Cut(v, "\n")
	n, _ := strconv.Atoi(v)
	return n
}

// diskFull reports whether the writable layer behind path has no room left:
// overlayfs reports its upper filesystem's figures.
func diskFull(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return st.Bavail*uint64(st.Bsize) < 64<<10 || st.Ffree == 0
}
