package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
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

	port, err := openPort(protocol.ChannelName, 10*time.Second, 2*time.Millisecond)
	if err != nil {
		return err
	}
	c := &conn{build: build, r: protocol.NewReader(port), w: protocol.NewWriter(port), port: port,
		sessions: map[uint32]*session{}, bye: make(chan struct{})}
	return c.serve()
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
// while there is none. The VM has one port (internal/vmm/qemu), which the
// guest names vport0p1: that one is checked first, and the others are
// only scanned if it is not the one.
func portDevice(name string) string {
	if portName("vport0p1") == name {
		return "/dev/vport0p1"
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
// connects or data arrives, which wakes the wait to look again; interval
// is only a fallback. (Polling the exec ports of protocol 4 every 20 ms
// cost an idle guest under TCG several percent of a host CPU.)
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

// hostEvents broadcasts each SIGIO to whatever waits for the host.
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

// conn is the agent's end of its one channel to the host: one goroutine
// (serve) reads the host's frames and hands each to its session; each
// session writes its own frames.
type conn struct {
	build string
	r     *protocol.Reader
	w     *protocol.Writer
	port  *os.File

	mu       sync.Mutex
	sessions map[uint32]*session
	workload *session // from Boot on
	// workloadExit is the workload's exit once reported: reported again
	// at Migrated, since the host it went to may be the one the VM left.
	workloadExit []byte
	bye          chan struct{} // closed at the host's Bye on the workload's session
	byeOnce      sync.Once
}

// session is one process (the workload's or an exec's) or control action.
type session struct {
	c   *conn
	id  uint32
	out *outCredit

	mu    sync.Mutex
	pid   int      // the process, once it runs
	ptmx  *os.File // its pty's master, with a TTY
	stdin *stdinWriter
	ended bool // the host said Bye
}

// serve answers the host's Hello and then reads its frames until the host
// goes away: then nobody will read the output, and the caller powers the
// VM off (its shim kills it anyway; this is the guest's part).
func (c *conn) serve() error {
	f, err := c.r.Read()
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
	if err := c.w.WriteJSON(protocol.THello, 0, protocol.Hello{Version: protocol.Version, Agent: c.build}); err != nil {
		return err
	}
	if hello.Version != protocol.Version {
		return fmt.Errorf("host speaks protocol %d, agent %d", hello.Version, protocol.Version)
	}
	for {
		f, err := c.r.Read()
		if err != nil {
			return fmt.Errorf("the host went away: %w", err)
		}
		c.dispatch(f)
	}
}

func (c *conn) dispatch(f protocol.Frame) {
	switch f.Type {
	case protocol.TBoot, protocol.TExec, protocol.TControl:
		c.open(f)
		return
	}
	c.mu.Lock()
	s := c.sessions[f.Session]
	c.mu.Unlock()
	if s == nil {
		return // a session that ended: the host's frame crossed its exit
	}
	switch f.Type {
	case protocol.TStdin:
		if in := s.input(); in != nil {
			in.write(f.Payload)
		}
	case protocol.TStdinClose:
		if in := s.input(); in != nil {
			in.close()
		}
	case protocol.TOutputAck:
		var a protocol.Ack
		if protocol.Decode(f, &a) == nil {
			s.out.ack(a.Bytes)
		}
	case protocol.TResize:
		var r protocol.Resize
		s.mu.Lock()
		if protocol.Decode(f, &r) == nil && s.ptmx != nil {
			_ = pty.Setsize(s.ptmx, &pty.Winsize{Rows: r.Rows, Cols: r.Cols})
		}
		s.mu.Unlock()
	case protocol.TSignal:
		var sg protocol.Signal
		if protocol.Decode(f, &sg) == nil && sg.Signal > 0 && sg.Signal < 65 {
			s.signal(unix.Signal(sg.Signal))
		}
	case protocol.TBye:
		if s == c.workload {
			c.byeOnce.Do(func() { close(c.bye) })
			return
		}
		s.end()
	}
}

// open starts the session a Boot, Exec or Control frame opens.
func (c *conn) open(f protocol.Frame) {
	s := &session{c: c, id: f.Session, out: newOutCredit()}
	c.mu.Lock()
	_, dup := c.sessions[f.Session]
	n, booted := len(c.sessions), c.workload != nil
	ok := false
	switch {
	case f.Session == 0 || dup:
	case n >= protocol.MaxSessions:
	case (f.Type == protocol.TBoot) == booted:
	default:
		ok = true
		c.sessions[s.id] = s
		if f.Type == protocol.TBoot {
			c.workload = s
		}
	}
	c.mu.Unlock()
	if !ok {
		why := fmt.Sprintf("session %d is in use", f.Session)
		switch {
		case n >= protocol.MaxSessions:
			why = fmt.Sprintf("the sandbox has %d sessions open, the most it may", n)
		case f.Type == protocol.TBoot && booted:
			why = "the sandbox has booted already"
		case f.Type != protocol.TBoot && !booted:
			why = "the sandbox has not booted"
		}
		if f.Session != 0 && !dup {
			_ = c.w.WriteJSON(protocol.TExit, f.Session, failure(exitHearth, "%s", why))
		}
		return
	}
	switch f.Type {
	case protocol.TBoot:
		var b protocol.Boot
		err := protocol.Decode(f, &b)
		go s.boot(&b, err)
	case protocol.TExec:
		var p protocol.Process
		err := protocol.Decode(f, &p)
		go s.exec(&p, err)
	case protocol.TControl:
		var ctl protocol.Control
		err := protocol.Decode(f, &ctl)
		go s.control(&ctl, err)
	}
}

func (c *conn) forget(s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sessions[s.id] == s && s != c.workload {
		delete(c.sessions, s.id)
	}
}

// restored ends every session but the workload's and keep (a fork's
// Restored, a moved VM's Migrated): their host was the previous one.
func (c *conn) restored(keep *session) {
	c.mu.Lock()
	var others []*session
	for _, s := range c.sessions {
		if s != keep && s != c.workload {
			others = append(others, s)
		}
	}
	c.mu.Unlock()
	for _, s := range others {
		s.end()
	}
}

func (s *session) input() *stdinWriter {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stdin
}

func (s *session) signal(sig unix.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pid > 0 && !s.ended {
		_ = unix.Kill(s.pid, sig)
	}
}

// end is the host's Bye on a session that is not the workload's: its
// process, if it still runs, is killed, and the session forgotten.
func (s *session) end() {
	s.mu.Lock()
	if s.pid > 0 && !s.ended {
		_ = unix.Kill(s.pid, unix.SIGKILL)
	}
	s.ended = true
	s.mu.Unlock()
	s.out.close()
	s.c.forget(s)
}

// exit reports how the session ended and forgets it.
func (s *session) exit(e protocol.Exit) {
	_ = s.c.w.WriteJSON(protocol.TExit, s.id, e)
	s.c.forget(s)
}

func failure(code int, format string, args ...any) protocol.Exit {
	return protocol.Exit{Code: code, Error: fmt.Sprintf(format, args...)}
}

// boot sets up the sandbox and runs the workload; its end is the VM's.
func (s *session) boot(b *protocol.Boot, err error) {
	defer powerOff()
	var exit protocol.Exit
	switch {
	case err != nil:
		exit = failure(exitHearth, "%v", err)
	case hostile(s, &b.Process): // only in a test build (-tags hostile)
		return
	default:
		exit = s.setUp(b)
		if exit == (protocol.Exit{}) {
			exit = s.run(&b.Process, true)
		}
	}
	report, _ := json.Marshal(exit)
	s.c.mu.Lock()
	s.c.workloadExit = report
	s.c.mu.Unlock()
	go func() { _ = s.c.w.Write(protocol.TExit, s.id, report) }()
	// Wait for the host's Bye so that the exit report is out of the
	// virtqueue before the VM resets (the host usually ends the VM first).
	select {
	case <-s.c.bye:
	case <-time.After(5 * time.Second):
		fmt.Fprintln(os.Stderr, "hearth-agent: the host did not take the exit report; powering off")
	}
}

// setUp makes the sandbox's clock, root filesystem and network; a zero
// Exit means it went well.
func (s *session) setUp(b *protocol.Boot) protocol.Exit {
	if b.Time != 0 {
		tv := unix.NsecToTimeval(b.Time)
		_ = unix.Settimeofday(&tv)
	}
	if err := setupRoot(b); err != nil {
		return failure(exitHearth, "set up root filesystem: %v", err)
	}
	if b.Network != nil {
		if err := setupNetwork(b.Network, b.Hostname); err != nil {
			return failure(exitHearth, "set up the network: %v", err)
		}
	}
	return protocol.Exit{}
}

// exec runs one more process in the sandbox.
func (s *session) exec(p *protocol.Process, err error) {
	switch {
	case err != nil:
		s.exit(failure(exitHearth, "%v", err))
	case hostile(s, p):
		s.c.forget(s)
	default:
		s.exit(s.run(p, false))
	}
}

// control carries out a control action. Restored and Migrated end the
// sessions the previous host had open and make the workload's output
// credit whole again, with the Exit: the host sees the new credit from
// that frame on.
func (s *session) control(ctl *protocol.Control, err error) {
	if err == nil {
		err = act(ctl)
	}
	exit := protocol.Exit{}
	if err != nil {
		exit = failure(exitHearth, "%s: %v", ctl.Action, err)
	}
	var then func()
	var again []byte // the workload's exit, reported again
	var wl *session
	if ctl.Action == protocol.Restored || ctl.Action == protocol.Migrated {
		s.c.restored(s)
		s.c.mu.Lock()
		wl = s.c.workload
		if ctl.Action == protocol.Migrated {
			again = s.c.workloadExit
		}
		s.c.mu.Unlock()
		if wl != nil {
			then = wl.out.reset
		}
	}
	b, _ := json.Marshal(exit)
	_ = s.c.w.WriteThen(protocol.TExit, s.id, b, then)
	if again != nil {
		_ = s.c.w.Write(protocol.TExit, wl.id, again)
	}
	s.c.forget(s)
}

// run runs p (the workload's process, or an exec's) to its end.
func (s *session) run(p *protocol.Process, workload bool) protocol.Exit {
	if len(p.Args) == 0 {
		return failure(exitHearth, "no command: the image has no Entrypoint or Cmd and none was given")
	}
	id, err := resolveUser(p.User)
	if err != nil {
		return failure(exitHearth, "%v", err)
	}
	hostname, _ := os.Hostname()
	env := completeEnv(p.Env, hostname, id.Home, p.TTY)
	dir := p.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return failure(exitHearth, "working directory %s: %v", dir, err)
	}
	path, err := lookPath(p.Args[0], getenv(env, "PATH"), dir)
	if err != nil {
		code := exitNotFound
		if errors.Is(err, errNotExecutable) {
			code = exitCannotInvoke
		}
		return failure(code, "exec %q: %v", p.Args[0], err)
	}

	// Not exec.Command: it would look the name up again, in the agent's
	// PATH. A relative Path is taken relative to Dir, as lookPath did.
	cmd := &exec.Cmd{Path: path, Args: p.Args, Env: env, Dir: dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: id.UID, Gid: id.GID, Groups: id.Groups},
	}
	oomBefore := oomKills()

	wio, err := startIO(cmd, p)
	if err != nil {
		return failure(exitHearth, "%v", err)
	}
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		wio.closeChild()
		return failure(exitHearth, "the host ended the session")
	}
	err = cmd.Start()
	if err == nil {
		s.pid, s.ptmx, s.stdin = cmd.Process.Pid, wio.pty, newStdinWriter(wio.stdin, s.c.w, s.id)
	}
	s.mu.Unlock()
	wio.closeChild()
	if err != nil {
		code := exitCannotInvoke
		if errors.Is(err, unix.ENOENT) {
			code = exitNotFound
		}
		return failure(code, "exec %q: %v", p.Args[0], err)
	}
	defer s.stdin.close()
	// Only now: the host starts sending stdin when it sees Started, and
	// the session must have somewhere to put it.
	exited := reap.wait(s.pid)
	_ = s.c.w.WriteJSON(protocol.TStarted, s.id, protocol.Started{Pid: s.pid})

	var pumps sync.WaitGroup
	for _, o := range wio.outputs {
		pumps.Add(1)
		go func() {
			defer pumps.Done()
			s.pump(o.t, o.f)
		}()
	}

	status := <-exited
	if workload {
		// Like the end of a container's PID namespace: whatever the
		// workload left behind (exec sessions too) dies with it, so that
		// its copies of stdout and stderr close.
		_ = unix.Kill(-1, unix.SIGKILL)
		reapAll()
	}
	waitTimeout(&pumps, 2*time.Second)
	s.out.close() // a pump still waiting for credit gives up

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

// pump sends what the process writes to f, within the session's output
// window.
func (s *session) pump(t protocol.Type, f *os.File) {
	defer f.Close()
	buf := make([]byte, protocol.ChunkSize)
	for {
		k := s.out.take(len(buf))
		if k == 0 {
			return // the session is over
		}
		n, err := f.Read(buf[:k])
		if n > 0 {
			if s.c.w.WriteThen(t, s.id, buf[:n], func() { s.out.commit(k, n) }) != nil {
				return
			}
		} else {
			s.out.commit(k, 0)
		}
		if err != nil { // EOF, or EIO from a pty master whose slave closed
			return
		}
	}
}

// outCredit is a session's output window: the agent has at most
// protocol.OutputWindow bytes sent and not acknowledged by the host (the
// host ends a guest that sends more). A pump reserves room before it
// reads, and counts what it sent as the frame goes out.
type outCredit struct {
	mu       sync.Mutex
	cond     *sync.Cond
	sent     int
	reserved int
	closed   bool
}

func newOutCredit() *outCredit {
	o := &outCredit{}
	o.cond = sync.NewCond(&o.mu)
	return o
}

// take waits for room and reserves up to want bytes of it; 0 once closed.
func (o *outCredit) take(want int) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	for !o.closed && o.sent+o.reserved >= protocol.OutputWindow {
		o.cond.Wait()
	}
	if o.closed {
		return 0
	}
	k := min(want, protocol.OutputWindow-o.sent-o.reserved)
	o.reserved += k
	return k
}

// commit turns k reserved bytes into n sent ones.
func (o *outCredit) commit(k, n int) {
	o.mu.Lock()
	o.reserved -= k
	o.sent += n
	o.mu.Unlock()
	o.cond.Broadcast()
}

// ack is the host's acknowledgement of n bytes.
func (o *outCredit) ack(n int) {
	o.mu.Lock()
	o.sent = max(0, o.sent-max(n, 0))
	o.mu.Unlock()
	o.cond.Broadcast()
}

// reset makes the window whole (Restored).
func (o *outCredit) reset() {
	o.mu.Lock()
	o.sent = 0
	o.mu.Unlock()
	o.cond.Broadcast()
}

func (o *outCredit) close() {
	o.mu.Lock()
	o.closed = true
	o.mu.Unlock()
	o.cond.Broadcast()
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

func startIO(cmd *exec.Cmd, st *protocol.Process) (*workloadIO, error) {
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

func newStdinWriter(f *os.File, w *protocol.Writer, id uint32) *stdinWriter {
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
			_ = w.WriteJSON(protocol.TStdinAck, id, protocol.Ack{Bytes: len(b)})
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
