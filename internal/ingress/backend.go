package ingress

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
)

// backend is the HTTP/1.1 front end's client to sandboxes: kept-alive
// connections per target address; a request is written and its response's
// headers read on the caller's goroutine (no hand-off to connection
// goroutines, as net/http's Transport does), with fasthttp's framing, and
// the body streams through as the client reads it. fasthttp's own
// HostClient keeps its read deadline on while the body streams, which
// would cut off event streams and downloads at the target's timeout: the
// timeout here bounds the response's headers only.
type backend struct {
	dial Dialer

	mu        sync.Mutex
	idle      map[string][]*backendConn
	nidle     int // connections in idle
	lastSweep time.Time
}

type backendConn struct {
	net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	used     time.Time // when it went idle
	deadline time.Time // its read deadline (zero: none)
	// writeIdle, if set, bounds each write (a request body streaming to a
	// sandbox that stopped reading).
	writeIdle time.Duration
}

func (c *backendConn) Write(p []byte) (int, error) {
	if c.writeIdle > 0 {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(c.writeIdle))
	}
	return c.Conn.Write(p)
}

// streamIdle bounds the silence of a body streaming either way between
// the ingress and a sandbox: a client that went away is otherwise never
// noticed while nothing moves.
const streamIdle = 5 * time.Minute

// keepStreaming moves the read deadline on while a body streams from the
// sandbox, when less than half of streamIdle is left.
func (c *backendConn) keepStreaming() {
	if now := time.Now(); c.deadline.Sub(now) < streamIdle/2 {
		c.deadline = now.Add(streamIdle)
		_ = c.SetReadDeadline(c.deadline)
	}
}

// fresh reports whether an idle connection is still fit to send a request
// on: the sandbox has neither closed it nor sent anything unasked (a 408
// from a server's own idle timeout, or a second response). Only a
// connection idle for a while is probed (one read that fails at once);
// the sandbox is the origin of every response on its connections anyway.
func (c *backendConn) fresh(now time.Time) bool {
	if c.br.Buffered() > 0 {
		return false
	}
	if now.Sub(c.used) < probeAfter {
		return true
	}
	_ = c.SetReadDeadline(time.Unix(1, 0))
	c.deadline = time.Unix(1, 0) // expired: the next exchange sets its own
	_, err := c.br.Peek(1)
	return isTimeout(err)
}

// armDeadline bounds the wait for a response's headers by timeout (0:
// none), moving the read deadline only when less than 90% of timeout is
// left of it: each move resets a runtime timer, which under load woke
// threads (futex) for 4% of the proxy's CPU. A kept-alive connection thus
// waits between 0.9 and 1 times timeout.
func (c *backendConn) armDeadline(timeout time.Duration) {
	if timeout <= 0 {
		c.clearDeadline()
		return
	}
	now := time.Now()
	if !c.deadline.IsZero() && c.deadline.Sub(now) > timeout-timeout/10 && c.deadline.Sub(now) <= timeout {
		return
	}
	c.deadline = now.Add(timeout)
	_ = c.SetReadDeadline(c.deadline)
}

func (c *backendConn) clearDeadline() {
	if !c.deadline.IsZero() {
		c.deadline = time.Time{}
		_ = c.SetReadDeadline(time.Time{})
	}
}

// Bounds on the idle connections kept to sandboxes.
const (
	// maxIdlePerTarget to one sandbox port, maxIdle in all.
	maxIdlePerTarget = 64
	maxIdle          = 1024
	// poolIdle is how long one is kept: less than the keep-alive timeouts
	// of common servers (Node 5 s), so that the sandbox seldom closes one
	// under a request.
	poolIdle = 4 * time.Second
	// probeAfter: a connection idle for longer is checked before use.
	probeAfter = 500 * time.Millisecond
)

func (b *backend) get(ctx context.Context, addr string) (*backendConn, bool, error) {
	now := time.Now()
	b.mu.Lock()
	for cs := b.idle[addr]; len(cs) > 0; cs = b.idle[addr] {
		c := cs[len(cs)-1]
		b.idle[addr] = cs[:len(cs)-1]
		b.nidle--
		b.mu.Unlock()
		if now.Sub(c.used) < poolIdle && c.fresh(now) {
			return c, true, nil
		}
		c.Close()
		b.mu.Lock()
	}
	b.mu.Unlock()
	c, err := b.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	return newBackendConn(c), false, nil
}

// newBackendConn wraps a new connection to a sandbox: its reader's size
// bounds a response's header block.
func newBackendConn(c net.Conn) *backendConn {
	bc := &backendConn{Conn: c, br: bufio.NewReaderSize(c, maxHeaderBytes)}
	bc.bw = bufio.NewWriterSize(bc, 16<<10) // through bc.Write, for writeIdle
	return bc
}

func (b *backend) put(addr string, c *backendConn) {
	if c.br.Buffered() > 0 { // more than the response: not a connection to trust
		c.Close()
		return
	}
	now := time.Now()
	c.used = now
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.idle == nil {
		b.idle = map[string][]*backendConn{}
	}
	if now.Sub(b.lastSweep) > poolIdle {
		b.sweep(now)
	}
	if len(b.idle[addr]) >= maxIdlePerTarget || b.nidle >= maxIdle {
		c.Close()
		return
	}
	b.idle[addr] = append(b.idle[addr], c)
	b.nidle++
}

// sweep closes connections idle for longer than poolIdle and forgets
// targets with none left: sandboxes come and go, their addresses with
// them. b.mu is held.
func (b *backend) sweep(now time.Time) {
	b.lastSweep = now
	for addr, cs := range b.idle {
		keep := cs[:0]
		for _, c := range cs {
			if now.Sub(c.used) > poolIdle {
				c.Close()
				b.nidle--
			} else {
				keep = append(keep, c)
			}
		}
		clear(cs[len(keep):])
		if len(keep) == 0 {
			delete(b.idle, addr)
		} else {
			b.idle[addr] = keep
		}
	}
}

// roundTrip sends req to t and reads the response's headers into resp
// within t.Timeout; resp's body then streams from the sandbox, and the
// connection goes back to the pool when the body has been read to its
// end. A kept-alive connection the sandbox closed meanwhile is retried
// once on a new one, for idempotent requests without a body.
func (b *backend) roundTrip(ctx context.Context, req *fasthttp.Request, resp *fasthttp.Response, t Target) error {
	// Decided before the first write, which uses a body stream up.
	canRetry := retryable(req)
	for attempt := 0; ; attempt++ {
		c, reused, err := b.get(ctx, t.Addr)
		if err != nil {
			return err
		}
		err = b.exchange(req, resp, c, t)
		if err == nil {
			return nil
		}
		c.Close()
		if reused && attempt == 0 && canRetry && !isTimeout(err) {
			continue
		}
		return err
	}
}

// retryable: an idempotent request with no body at all (not even an empty
// chunked one).
func retryable(req *fasthttp.Request) bool {
	if n := req.Header.ContentLength(); req.IsBodyStream() || len(req.Body()) > 0 || (n != 0 && n != -2) {
		return false
	}
	switch string(req.Header.Method()) {
	case fasthttp.MethodGet, fasthttp.MethodHead, fasthttp.MethodOptions, fasthttp.MethodTrace:
		return true
	}
	return false
}

// exchange writes req on c and reads the response's headers; the body is
// left to stream (resp's body stream is a backendBody that gives c back).
func (b *backend) exchange(req *fasthttp.Request, resp *fasthttp.Response, c *backendConn, t Target) error {
	if req.IsBodyStream() {
		c.writeIdle = streamIdle
		defer func() { c.writeIdle = 0; _ = c.SetWriteDeadline(time.Time{}) }()
	}
	if err := req.Write(c.bw); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	c.armDeadline(t.Timeout)
	in := fasthttp.AcquireResponse()
	in.StreamBody = true
	in.SkipBody = req.Header.IsHead()
	// Interim 1xx responses are read and dropped, up to fasthttp's limit;
	// a header block over maxHeaderBytes (the reader's size) is an error.
	if err := in.Read(c.br); err != nil {
		fasthttp.ReleaseResponse(in)
		return err
	}
	if in.Header.StatusCode() == fasthttp.StatusSwitchingProtocols {
		// Only an upgrade request (http1.go's upgrade) may be answered so.
		fasthttp.ReleaseResponse(in)
		return errors.New("the sandbox switched protocols unasked")
	}
	if n := in.Header.ContentLength(); n < 0 || c.br.Buffered() < n {
		// The body streams, silent for at most streamIdle at a time. (One
		// already in the buffer is not read from the connection: no
		// deadline to move; the next exchange sets its own.)
		c.deadline = time.Time{}
		c.keepStreaming()
	}
	b.passOn(in, resp, c, t.Addr, true)
	return nil
}

// passOn gives the sandbox's response in (its headers read, its body not)
// to the front end's resp: the headers copied, the body a stream that
// gives c back to the pool (if keep) once read to its end.
func (b *backend) passOn(in, resp *fasthttp.Response, c *backendConn, addr string, keep bool) {
	in.Header.CopyTo(&resp.Header)
	resp.Header.SetNoDefaultContentType(true) // none if the sandbox sent none
	n := in.Header.ContentLength()
	body := &backendBody{b: b, addr: addr, c: c, in: in, r: in.BodyStream(),
		keep: keep && !in.ConnectionClose() && n != -2}
	if body.r == nil { // no body: HEAD, 204, 304
		body.eof = true
		body.Close()
		return
	}
	if n == -2 { // to the end of the connection: chunked to the client
		n = -1
	}
	resp.SetBodyStream(body, n)
}

// backendBody is a response body streaming from a sandbox; Close (the
// front end's, once it has written the body or given up) gives the
// connection back if the body was read to its end.
type backendBody struct {
	b    *backend
	addr string
	c    *backendConn
	in   *fasthttp.Response
	r    io.Reader
	keep bool
	eof  bool
	done bool
}

func (x *backendBody) Read(p []byte) (int, error) {
	if x.c.br.Buffered() == 0 { // this read waits on the sandbox
		x.c.keepStreaming()
	}
	n, err := x.r.Read(p)
	if err == io.EOF {
		x.eof = true
	}
	return n, err
}

func (x *backendBody) Close() error {
	if x.done {
		return nil
	}
	x.done = true
	err := x.in.CloseBodyStream()
	fasthttp.ReleaseResponse(x.in)
	if x.eof && x.keep && err == nil {
		x.b.put(x.addr, x.c)
		return nil
	}
	x.c.Close()
	return err
}
