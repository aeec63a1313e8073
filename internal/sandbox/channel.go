package sandbox

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
)

// channel is the host's end of a guest agent's one channel: one goroutine
// (loop) reads every frame the guest sends and hands it to its session;
// sessions write their own frames. Whatever the guest sends is checked
// here, and a guest that breaks the protocol ends the channel, every
// session on it, and so its sandbox (the owner kills the VM).
//
// The reader never blocks on a session: a session's output is queued,
// within the window the guest may not exceed (protocol.OutputWindow),
// and written to its sinks by the session's own goroutine, which returns
// credit as it goes.
type channel struct {
	conn net.Conn
	w    *protocol.Writer
	log  *slog.Logger

	mu       sync.Mutex
	sessions map[uint32]*stream
	// next is the id the next session gets; the ids below it that are
	// not open are past sessions, whose late frames are dropped.
	next uint32
	err  error // why the channel ended
	done chan struct{}
	// moving refuses new sessions while the VM migrates; moved makes the
	// channel's end ErrMigrated: the VM runs on elsewhere.
	moving, moved bool
}

// errChannelClosed wraps a read error that is not the guest's fault: the
// VM ended, or the host closed the channel.
var errChannelClosed = errors.New("the guest agent's channel closed")

func newChannel(conn net.Conn, next uint32, log *slog.Logger) *channel {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &channel{conn: conn, w: protocol.NewWriter(conn), log: log,
		sessions: map[uint32]*stream{}, next: max(next, 1), done: make(chan struct{})}
}

// hello sends the host's Hello, and then first (the workload's Boot) at
// once: the guest reads Boot as soon as it has answered.
func (c *channel) hello() error {
	return c.w.WriteJSON(protocol.THello, 0, protocol.Hello{Version: protocol.Version})
}

// awaitHello reads the guest's Hello within limit and then serves the
// channel (loop). A guest of another protocol version is ErrBoot: the
// host's or the snapshot's mistake, not an attack.
func (c *channel) awaitHello(limit time.Duration) (*protocol.Reader, error) {
	r := protocol.NewReader(c.conn)
	_ = c.conn.SetReadDeadline(time.Now().Add(limit))
	f, err := r.Read()
	_ = c.conn.SetReadDeadline(time.Time{})
	switch {
	case errors.Is(err, protocol.ErrFrame):
		return nil, fmt.Errorf("%w: its first frame: %w", ErrGuestProtocol, err)
	case err != nil:
		return nil, fmt.Errorf("%w: the guest agent never answered: %v", errChannelClosed, err)
	case f.Type != protocol.THello || f.Session != 0:
		return nil, fmt.Errorf("%w: it answered with %s on session %d, not hello", ErrGuestProtocol, f.Type, f.Session)
	}
	var hello protocol.Hello
	if err := protocol.Decode(f, &hello); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrGuestProtocol, err)
	}
	if hello.Version != protocol.Version {
		return nil, fmt.Errorf("%w: guest agent %.64q speaks protocol %d, hearth %d", ErrBoot, hello.Agent, hello.Version, protocol.Version)
	}
	return r, nil
}

// loop reads the guest's frames until the channel ends.
func (c *channel) loop(r *protocol.Reader) {
	for {
		f, err := r.Read()
		if err != nil {
			if errors.Is(err, protocol.ErrFrame) {
				err = fmt.Errorf("%w: %w", ErrGuestProtocol, err)
			} else {
				err = fmt.Errorf("%w: %w", errChannelClosed, err)
			}
			c.fail(err)
			return
		}
		if err := c.dispatch(f); err != nil {
			if !errors.Is(err, ErrGuestProtocol) {
				err = fmt.Errorf("%w: %w", ErrGuestProtocol, err)
			}
			c.fail(err)
			return
		}
	}
}

// dispatch checks one frame and hands it to its session.
func (c *channel) dispatch(f protocol.Frame) error {
	if !f.Type.FromGuest() {
		return fmt.Errorf("it sent %s on session %d, which only the host sends", f.Type, f.Session)
	}
	if f.Session == 0 {
		return fmt.Errorf("it sent %s on session 0 after the handshake", f.Type)
	}
	c.mu.Lock()
	s, open := c.sessions[f.Session]
	past := f.Session < c.next
	c.mu.Unlock()
	if !open {
		if past {
			return nil // a session the host ended: its late frames mean nothing
		}
		return fmt.Errorf("it sent %s on session %d, which was never opened", f.Type, f.Session)
	}
	switch f.Type {
	case protocol.THello:
		return fmt.Errorf("a second hello, on session %d", f.Session)
	case protocol.TStarted:
		s.startOnce.Do(func() { close(s.started) })
	case protocol.TStdout, protocol.TStderr:
		return s.output(f)
	case protocol.TStdinAck:
		var a protocol.Ack
		if err := protocol.Decode(f, &a); err != nil {
			return err
		}
		return s.stdin.add(a.Bytes)
	case protocol.TExit:
		if c.handedOver(f.Session) {
			// Its exit is the target's to report (the guest reports it
			// again there at Migrated): it must not end here too.
			return nil
		}
		var e protocol.Exit
		if err := protocol.Decode(f, &e); err != nil {
			return err
		}
		// What a shell could report: 0-255, and signals 1-64.
		if e.Code < 0 || e.Code > 255 || e.Signal < 0 || e.Signal > 64 {
			return fmt.Errorf("exit code %d, signal %d", e.Code, e.Signal)
		}
		c.forget(s)
		s.finish(&e, nil)
	}
	return nil
}

// fail ends the channel with err and every session on it.
func (c *channel) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if c.moved {
		err = ErrMigrated
	}
	c.err = err
	sessions := c.sessions
	c.sessions = map[uint32]*stream{}
	c.mu.Unlock()
	c.conn.Close()
	for _, s := range sessions {
		s.finish(nil, err)
	}
	close(c.done)
}

// Err is why the channel ended; nil while it serves.
func (c *channel) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// close ends the channel from the host's side.
func (c *channel) close() { c.fail(fmt.Errorf("%w: by the host", errChannelClosed)) }

// sinks is where a session's output goes.
type sinks struct{ stdout, stderr io.Writer }

// open starts a session: the frame (Boot, Exec or Control) with payload
// v, under a new id.
func (c *channel) open(t protocol.Type, v any, out sinks) (*stream, error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	if c.moving {
		c.mu.Unlock()
		return nil, ErrMigrating
	}
	if len(c.sessions) >= protocol.MaxSessions {
		c.mu.Unlock()
		return nil, fmt.Errorf("the sandbox has %d sessions open, the most it may", protocol.MaxSessions)
	}
	s := c.register(c.next, out, protocol.OutputWindow)
	c.next++
	c.mu.Unlock()
	if err := c.w.WriteJSON(t, s.id, v); err != nil {
		c.forget(s)
		s.finish(nil, err)
		return nil, fmt.Errorf("open a %s session: %w", t, err)
	}
	return s, nil
}

// adopt takes over session id, which a snapshot's guest has open (a
// fork's workload). Its output window is twice the usual: the guest's
// credit was whole again at Restored, and output it sent before that,
// for which the saved VM's host may have returned credit the fork never
// saw, can still be on its way.
func (c *channel) adopt(id uint32, out sinks) *stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.register(id, out, 2*protocol.OutputWindow)
	close(s.started)
	s.startOnce.Do(func() {})
	return s
}

// register adds a session; c.mu is held.
func (c *channel) register(id uint32, out sinks, window int) *stream {
	s := &stream{c: c, id: id, out: out, window: window,
		started: make(chan struct{}), ended: make(chan struct{}), stdin: newCredit(protocol.StdinWindow)}
	s.cond = sync.NewCond(&s.mu)
	c.sessions[id] = s
	go s.drain()
	return s
}

func (c *channel) forget(s *stream) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sessions[s.id] == s {
		delete(c.sessions, s.id)
	}
}

// nextID is the id the next session will get.
func (c *channel) nextID() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.next
}

// stream is one session on a channel, as the host sees it.
type stream struct {
	c      *channel
	id     uint32
	out    sinks
	window int
	stdin  *credit

	started   chan struct{} // closed at the guest's Started
	startOnce sync.Once
	ended     chan struct{} // closed when the exit is known and the output written

	mu      sync.Mutex
	cond    *sync.Cond
	queue   []chunk // output not yet written to the sinks
	unack   int     // output bytes received and not yet acknowledged
	exit    *protocol.Exit
	err     error
	done    bool // exit or err is set
	sinkErr error
}

type chunk struct {
	stderr bool
	b      []byte
}

// output queues a frame of output, within the session's window.
func (s *stream) output(f protocol.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unack+len(f.Payload) > s.window {
		return fmt.Errorf("session %d sent %d bytes of output past its window of %d", s.id, s.unack+len(f.Payload)-s.window, s.window)
	}
	select {
	case <-s.started:
	default:
		return fmt.Errorf("session %d sent %s before it started", s.id, f.Type)
	}
	s.unack += len(f.Payload)
	s.queue = append(s.queue, chunk{f.Type == protocol.TStderr, append([]byte(nil), f.Payload...)})
	s.cond.Signal()
	return nil
}

// finish records how the session ended: its exit, or the channel's error.
func (s *stream) finish(e *protocol.Exit, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.exit, s.err, s.done = e, err, true
	s.stdin.close()
	s.cond.Signal()
}

// drain writes the session's output to its sinks and returns the credit,
// until the session has ended; then it closes ended.
func (s *stream) drain() {
	defer close(s.ended)
	written := 0 // bytes written to the sinks and not yet acknowledged
	for {
		s.mu.Lock()
		if len(s.queue) == 0 && written > 0 && !s.done {
			// Everything received is written: return the credit before
			// waiting for more.
			s.mu.Unlock()
			s.ack(written)
			written = 0
			continue
		}
		for len(s.queue) == 0 && !s.done {
			s.cond.Wait()
		}
		if len(s.queue) == 0 {
			s.mu.Unlock()
			return
		}
		c := s.queue[0]
		s.queue = s.queue[1:]
		sinkErr := s.sinkErr
		s.mu.Unlock()
		if sinkErr == nil {
			w := s.out.stdout
			if c.stderr {
				w = s.out.stderr
			}
			if _, err := w.Write(c.b); err != nil {
				// The reader is gone, as with `| head`: the session ends
				// (Bye: the guest kills its process, which would
				// otherwise write on forever), its output is dropped from
				// here on, and its credit still returned.
				err = &OutputError{Err: err}
				s.mu.Lock()
				s.sinkErr = err
				s.mu.Unlock()
				s.hangUp(err)
			}
		}
		if written += len(c.b); written >= s.window/4 {
			s.ack(written)
			written = 0
		}
	}
}

// ack returns n bytes of output credit: the window the host keeps is
// what was received less what was acknowledged.
func (s *stream) ack(n int) {
	s.mu.Lock()
	s.unack -= n
	s.mu.Unlock()
	_ = s.c.w.WriteJSON(protocol.TOutputAck, s.id, protocol.Ack{Bytes: n})
}

// result is how the session ended, once ended is closed.
func (s *stream) result() (*protocol.Exit, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	return s.exit, s.sinkErr
}

// send writes a frame of the session's.
func (s *stream) send(t protocol.Type, payload []byte) error {
	return s.c.w.Write(t, s.id, payload)
}

func (s *stream) sendJSON(t protocol.Type, v any) error { return s.c.w.WriteJSON(t, s.id, v) }

// close ends the session from the host's side: Bye tells the guest to
// kill its process if it still runs, and its late frames are dropped.
func (s *stream) close() {
	select {
	case <-s.ended:
		s.c.forget(s)
	default:
		s.hangUp(errSessionClosed)
	}
}

// hangUp ends the session from the host's side with err.
func (s *stream) hangUp(err error) {
	s.c.forget(s)
	_ = s.send(protocol.TBye, nil)
	s.finish(nil, err)
}

var errSessionClosed = errors.New("the session was ended by the host")

// OutputError is a session ended because its output could not be written:
// whoever read it has gone. Err is the sink's error (often EPIPE).
type OutputError struct{ Err error }

func (e *OutputError) Error() string { return "write output: " + e.Err.Error() }
func (e *OutputError) Unwrap() error { return e.Err }
