package shim

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

// The shim serves what is done to its running VM on apiSock in its run
// directory, one request a connection, as containerd's shims do: exec
// (with its streams), a readiness probe, snapshots. The node agent never
// dials the VM itself: the shim owns the VM's one channel, and a
// restarted agent finds its shims' sockets where it left them.
//
// A connection speaks the guest protocol's framing on session 0: the
// client's first frame is a control frame whose payload is a Request;
// for an exec, the client then sends stdin, resize and signal frames,
// and the shim started, stdout and stderr frames; the shim's last frame
// is an exit frame whose payload is a Reply. The socket is the root's
// alone (mode 0600 in a 0700 directory): no VMM can reach it.
const apiSock = "shim.sock"

// Ops a Request names.
const (
	OpExec         = "exec"
	OpProbe        = "probe"         // a TCP connection to Port in the guest
	OpSnapshot     = "snapshot"      // memory, devices and disk into Dir
	OpSnapshotDisk = "snapshot-disk" // the writable disk alone into Dir
	// OpMigrate moves the sandbox out over the stream socket sent with
	// the request (SCM_RIGHTS) to an incoming shim (StartIncoming).
	OpMigrate = "migrate"
)

// Request is what a client asks of the shim.
type Request struct {
	Op   string            `json:"op"`
	Exec *sandbox.ExecSpec `json:"exec,omitempty"`
	Port int               `json:"port,omitempty"`
	Dir  string            `json:"dir,omitempty"` // an empty directory, for the snapshots
	// Migrate is OpMigrate's.
	Migrate *MigrateOptions `json:"migrate,omitempty"`
}

// MigrateOptions are a migration's limits (vmm.MigrateOptions; zero:
// its defaults).
type MigrateOptions struct {
	DowntimeLimit  time.Duration `json:"downtimeLimit,omitempty"`
	Timeout        time.Duration `json:"timeout,omitempty"`
	BandwidthBytes int64         `json:"bandwidthBytes,omitempty"` // a second
}

// Reply is how a request ended: an exec's exit, or why it failed.
type Reply struct {
	Exit   *protocol.Exit `json:"exit,omitempty"`
	Error  string         `json:"error,omitempty"`
	Reason string         `json:"reason,omitempty"` // GuestProtocolError: the guest broke the protocol
	// Migrated is what a successful OpMigrate took.
	Migrated *vmm.MigrateStats `json:"migrated,omitempty"`
}

// ErrNotRunning means the run's workload does not run (yet, or any more).
var ErrNotRunning = errors.New("the sandbox's workload is not running")

// api serves a running sandbox on the run directory's socket.
type api struct {
	ln       net.Listener
	requests sync.WaitGroup
}

// serveAPI serves r on the run directory's socket until ctx ends or
// close.
func serveAPI(ctx context.Context, log *slog.Logger, r *sandbox.Running) (*api, error) {
	_ = os.Remove(apiSock)
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", apiSock)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("shim socket: %w", err)
	}
	a := &api{ln: ln}
	context.AfterFunc(ctx, func() { ln.Close() })
	a.requests.Add(1)
	go func() {
		defer a.requests.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.requests.Add(1)
			go func() {
				defer a.requests.Done()
				serveConn(ctx, log, r, c)
			}()
		}
	}()
	return a, nil
}

// close stops taking requests and waits up to grace for those in
// flight to send their replies (the sandbox has ended: they end at
// once, with why).
func (a *api) close(grace time.Duration) {
	a.ln.Close()
	done := make(chan struct{})
	go func() { a.requests.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
	}
}

func serveConn(ctx context.Context, log *slog.Logger, r *sandbox.Running, c net.Conn) {
	defer c.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The request's first bytes may carry a descriptor (OpMigrate's).
	rc := &rightsReader{c: c.(*net.UnixConn)}
	defer rc.close()
	fr, w := protocol.NewReader(rc), protocol.NewWriter(c)
	f, err := fr.Read()
	var req Request
	if err == nil && f.Type == protocol.TControl {
		err = protocol.Decode(f, &req)
	}
	if err != nil || f.Type != protocol.TControl {
		log.Warn("a bad request on the shim's socket", "err", err)
		return
	}
	// What the client sends next: an exec's streams; its end (the client
	// went away) ends the request.
	in := &execInput{resize: make(chan protocol.Resize, 4), signals: make(chan syscall.Signal, 4)}
	in.stdin, in.stdinW = io.Pipe()
	defer in.stdin.Close() // a write of stdin still waiting returns
	go func() {
		defer cancel()
		in.read(ctx, fr)
	}()
	var rep Reply
	switch req.Op {
	case OpExec:
		if req.Exec == nil {
			rep.Error = "exec: no process"
			break
		}
		sio := sandbox.IO{Stdout: frames{w, protocol.TStdout}, Stderr: frames{w, protocol.TStderr},
			Resize: in.resize, Signals: in.signals,
			Started: func() { _ = w.Write(protocol.TStarted, 0, nil) }}
		if req.Exec.Stdin {
			sio.Stdin = in.stdin
		} else {
			in.stdin.Close()
		}
		res, err := r.Exec(ctx, *req.Exec, sio)
		if err != nil {
			rep = failed(err)
			break
		}
		rep.Exit = &protocol.Exit{Code: res.ExitCode, Signal: res.Signal, OOM: res.OOM, DiskFull: res.DiskFull, Error: res.Error}
	case OpProbe:
		rep = failed(r.Control(ctx, protocol.Control{Action: protocol.Probe, Port: req.Port}))
	case OpSnapshot:
		rep = failed(r.Snapshot(ctx, req.Dir))
	case OpSnapshotDisk:
		rep = failed(r.SnapshotDisk(ctx, req.Dir))
	case OpMigrate:
		stream := rc.take()
		if stream == nil || req.Migrate == nil {
			rep.Error = "migrate: no stream socket, or no options, with the request"
			break
		}
		o := req.Migrate
		if o.DowntimeLimit < 0 || o.Timeout < 0 || o.BandwidthBytes < 0 {
			stream.Close()
			rep.Error = fmt.Sprintf("migrate: negative limits %+v", *o)
			break
		}
		stats, err := r.MigrateOut(ctx, stream, vmm.MigrateOptions{DowntimeLimit: o.DowntimeLimit, Timeout: o.Timeout, Bandwidth: o.BandwidthBytes})
		stream.Close()
		if rep = failed(err); err == nil {
			rep.Migrated = &stats
		}
	default:
		rep.Error = fmt.Sprintf("unknown op %q", req.Op)
	}
	_ = w.WriteJSON(protocol.TExit, 0, rep)
}

// rightsReader reads a request, taking the one descriptor its first
// bytes may carry (more, or a cut list, are closed and refused).
type rightsReader struct {
	c      *net.UnixConn
	read   bool
	stream *os.File
}

func (r *rightsReader) Read(p []byte) (int, error) {
	if r.read {
		return r.c.Read(p)
	}
	r.read = true
	oob := make([]byte, syscall.CmsgSpace(4*maxRights))
	n, oobn, flags, _, err := r.c.ReadMsgUnix(p, oob)
	var fds []int
	if msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn]); perr == nil {
		for _, m := range msgs {
			if rights, err := syscall.ParseUnixRights(&m); err == nil {
				fds = append(fds, rights...)
			}
		}
	}
	if len(fds) == 1 && flags&syscall.MSG_CTRUNC == 0 {
		syscall.CloseOnExec(fds[0])
		r.stream = os.NewFile(uintptr(fds[0]), "migration stream")
	} else {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
	return n, err
}

// maxRights is the most descriptors a request's first read takes in (one
// is all any request may carry; the rest are closed).
const maxRights = 4

// take hands the request's descriptor, if any, over to the caller.
func (r *rightsReader) take() *os.File {
	f := r.stream
	r.stream = nil
	return f
}

func (r *rightsReader) close() {
	if r.stream != nil {
		r.stream.Close()
	}
}

// failed is the reply for err (nil: success).
func failed(err error) Reply {
	if err == nil {
		return Reply{}
	}
	rep := Reply{Error: err.Error()}
	if errors.Is(err, sandbox.ErrGuestProtocol) {
		rep.Reason = "GuestProtocolError"
	}
	return rep
}

// execInput is what an exec's client sends.
type execInput struct {
	stdin   *io.PipeReader
	stdinW  *io.PipeWriter
	resize  chan protocol.Resize
	signals chan syscall.Signal
}

func (in *execInput) read(ctx context.Context, fr *protocol.Reader) {
	defer in.stdinW.Close()
	for {
		f, err := fr.Read()
		if err != nil {
			in.stdinW.CloseWithError(io.ErrUnexpectedEOF)
			return
		}
		switch f.Type {
		case protocol.TStdin:
			if _, err := in.stdinW.Write(f.Payload); err != nil {
				continue // the process's stdin is closed: drop the rest
			}
		case protocol.TStdinClose:
			in.stdinW.Close()
		case protocol.TResize:
			var r protocol.Resize
			if protocol.Decode(f, &r) == nil {
				select {
				case in.resize <- r:
				case <-ctx.Done():
				}
			}
		case protocol.TSignal:
			var s protocol.Signal
			if protocol.Decode(f, &s) == nil {
				select {
				case in.signals <- syscall.Signal(s.Signal):
				case <-ctx.Done():
				}
			}
		}
	}
}

// frames writes what it is given as data frames of one type.
type frames struct {
	w *protocol.Writer
	t protocol.Type
}

func (f frames) Write(p []byte) (int, error) {
	if err := f.w.WriteStream(f.t, 0, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// dial connects to the shim of the run directory dir and sends req, with
// the descriptor of send if it is not nil.
func dial(ctx context.Context, dir string, req Request, send *os.File) (net.Conn, *protocol.Reader, *protocol.Writer, error) {
	c, err := dialUnix(ctx, filepath.Join(dir, apiSock))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, nil, nil, ErrNotRunning
		}
		return nil, nil, nil, fmt.Errorf("connect to the shim: %w", err)
	}
	context.AfterFunc(ctx, func() { c.Close() })
	var frame bytes.Buffer
	if err := protocol.NewWriter(&frame).WriteJSON(protocol.TControl, 0, req); err != nil {
		c.Close()
		return nil, nil, nil, err
	}
	var rights []byte
	if send != nil {
		rights = syscall.UnixRights(int(send.Fd()))
	}
	if _, _, err := c.(*net.UnixConn).WriteMsgUnix(frame.Bytes(), rights, nil); err != nil {
		c.Close()
		return nil, nil, nil, fmt.Errorf("send to the shim: %w", err)
	}
	return c, protocol.NewReader(c), protocol.NewWriter(c), nil
}

// dialUnix connects to the unix socket at path, which may be longer than
// a socket address holds (108 bytes: a run directory under a long data
// directory): then through /proc/self/fd and a descriptor of its
// directory.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	if len(path) < 100 {
		return d.DialContext(ctx, "unix", path)
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	return d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path)))
}

// DialStdin connects to the workload's stdin of the run directory dir
// (Spec.Sandbox.Stdin), for attach.
func DialStdin(ctx context.Context, dir string) (*net.UnixConn, error) {
	c, err := dialUnix(ctx, StdinSocket(dir))
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

// reply reads the shim's frames until its Reply; an exec's output frames
// go to sio on the way.
func reply(ctx context.Context, r *protocol.Reader, sio sandbox.IO) (Reply, error) {
	for {
		f, err := r.Read()
		if err != nil {
			if ctx.Err() != nil {
				return Reply{}, ctx.Err()
			}
			return Reply{}, fmt.Errorf("the shim went away: %w", err)
		}
		switch f.Type {
		case protocol.TStarted:
			if sio.Started != nil {
				sio.Started()
			}
		case protocol.TStdout:
			if _, err := sio.Stdout.Write(f.Payload); err != nil {
				return Reply{}, fmt.Errorf("write stdout: %w", err)
			}
		case protocol.TStderr:
			if _, err := sio.Stderr.Write(f.Payload); err != nil {
				return Reply{}, fmt.Errorf("write stderr: %w", err)
			}
		case protocol.TExit:
			var rep Reply
			if err := json.Unmarshal(f.Payload, &rep); err != nil {
				return Reply{}, fmt.Errorf("the shim's reply: %w", err)
			}
			return rep, nil
		}
	}
}

// err is the reply's error, with the guest's protocol errors as
// sandbox.ErrGuestProtocol.
func (rep Reply) err() error {
	switch {
	case rep.Error == "":
		return nil
	case rep.Reason == "GuestProtocolError":
		return guestProtocolError(rep.Error)
	}
	return errors.New(rep.Error)
}

// guestProtocolError is the shim's sandbox.ErrGuestProtocol, whose text
// already says so.
type guestProtocolError string

func (e guestProtocolError) Error() string { return string(e) }
func (e guestProtocolError) Unwrap() error { return sandbox.ErrGuestProtocol }

// call makes a request with no streams of the shim of run directory dir.
func call(ctx context.Context, dir string, req Request) error {
	c, r, _, err := dial(ctx, dir, req, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	rep, err := reply(ctx, r, sandbox.IO{Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		return err
	}
	return rep.err()
}

// Probe asks the shim of run directory dir whether its guest accepts a
// TCP connection to port.
func Probe(ctx context.Context, dir string, port int) error {
	return call(ctx, dir, Request{Op: OpProbe, Port: port})
}

// Snapshot has the shim of run directory dir save its sandbox into the
// empty directory into: memory and all, or its writable disk alone.
func Snapshot(ctx context.Context, dir, into string, diskOnly bool) error {
	op := OpSnapshot
	if diskOnly {
		op = OpSnapshotDisk
	}
	return call(ctx, dir, Request{Op: op, Dir: into})
}

// Migrate has the shim of run directory dir move its sandbox out over
// stream, a stream socket to an incoming shim (StartIncoming) or a relay
// to one, and returns what the move took. On success the run ends with
// reason Migrated; on failure the sandbox runs on here.
func Migrate(ctx context.Context, dir string, stream *os.File, opts MigrateOptions) (vmm.MigrateStats, error) {
	c, r, _, err := dial(ctx, dir, Request{Op: OpMigrate, Migrate: &opts}, stream)
	if err != nil {
		return vmm.MigrateStats{}, err
	}
	defer c.Close()
	rep, err := reply(ctx, r, sandbox.IO{Stdout: io.Discard, Stderr: io.Discard})
	if err != nil {
		return vmm.MigrateStats{}, err
	}
	if err := rep.err(); err != nil {
		return vmm.MigrateStats{}, err
	}
	if rep.Migrated == nil {
		return vmm.MigrateStats{}, errors.New("the shim's reply has no migration")
	}
	return *rep.Migrated, nil
}

// Exec runs spec in the sandbox of run directory dir, with its streams
// on sio, and returns how it ended.
func Exec(ctx context.Context, dir string, spec sandbox.ExecSpec, sio sandbox.IO) (*sandbox.Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c, r, w, err := dial(ctx, dir, Request{Op: OpExec, Exec: &spec}, nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if spec.Stdin && sio.Stdin != nil {
		go func() {
			buf := make([]byte, protocol.ChunkSize)
			for {
				n, err := sio.Stdin.Read(buf)
				if n > 0 && w.Write(protocol.TStdin, 0, buf[:n]) != nil {
					return
				}
				if err != nil {
					_ = w.Write(protocol.TStdinClose, 0, nil)
					return
				}
			}
		}()
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case rs, ok := <-sio.Resize:
				if !ok {
					sio.Resize = nil
					continue
				}
				_ = w.WriteJSON(protocol.TResize, 0, rs)
			case sig, ok := <-sio.Signals:
				if !ok {
					sio.Signals = nil
					continue
				}
				_ = w.WriteJSON(protocol.TSignal, 0, protocol.Signal{Signal: int(sig)})
			}
		}
	}()
	rep, err := reply(ctx, r, sio)
	if err != nil {
		return nil, err
	}
	if err := rep.err(); err != nil {
		return nil, err
	}
	if rep.Exit == nil {
		return nil, errors.New("the shim's reply has no exit")
	}
	e := rep.Exit
	return &sandbox.Result{ExitCode: e.Code, Signal: e.Signal, OOM: e.OOM, DiskFull: e.DiskFull, Error: e.Error}, nil
}
