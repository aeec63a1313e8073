package ingress

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// connPool is the proxy's HTTP/1.1 client to sandboxes: it writes the
// request and reads the response on the caller's goroutine, over a kept-
// alive connection per request in flight. net/http's Transport hands each
// request to a connection's writer and reader goroutines and back, three
// goroutine switches a request, which at this proxy's request rates cost
// more than the proxying (hearth bench ingress: 7k requests/s against
// nginx's 14k with it on 2 cores). Parsing and framing are net/http's own
// (Request.Write, ReadResponse).
type connPool struct {
	dial Dialer
	mu   sync.Mutex
	idle map[string][]*poolConn
}

type poolConn struct {
	net.Conn
	br *bufio.Reader
	bw *bufio.Writer
}

const maxIdlePerTarget = 256

func (p *connPool) get(ctx context.Context, addr string) (*poolConn, bool, error) {
	p.mu.Lock()
	if cs := p.idle[addr]; len(cs) > 0 {
		c := cs[len(cs)-1]
		p.idle[addr] = cs[:len(cs)-1]
		p.mu.Unlock()
		return c, true, nil
	}
	p.mu.Unlock()
	c, err := p.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	return &poolConn{Conn: c, br: bufio.NewReaderSize(c, 16<<10), bw: bufio.NewWriterSize(c, 16<<10)}, false, nil
}

func (p *connPool) put(addr string, c *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.idle == nil {
		p.idle = map[string][]*poolConn{}
	}
	if len(p.idle[addr]) >= maxIdlePerTarget {
		c.Close()
		return
	}
	p.idle[addr] = append(p.idle[addr], c)
}

// roundTrip sends r to addr and reads the response headers within
// timeout (0: no limit). A kept-alive connection the sandbox closed
// meanwhile is retried once on a new one, for requests without a body.
func (p *connPool) roundTrip(r *http.Request, addr string, timeout time.Duration) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		c, reused, err := p.get(r.Context(), addr)
		if err != nil {
			return nil, err
		}
		resp, err := p.exchange(r, c, timeout)
		if err == nil {
			return p.bind(resp, addr, c), nil
		}
		c.Close()
		if reused && attempt == 0 && (r.Body == nil || r.Body == http.NoBody) && !errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		return nil, err
	}
}

func (p *connPool) exchange(r *http.Request, c *poolConn, timeout time.Duration) (*http.Response, error) {
	if timeout > 0 {
		_ = c.SetReadDeadline(time.Now().Add(timeout))
	}
	// A client that goes away ends the wait.
	stop := context.AfterFunc(r.Context(), func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := r.Write(c.bw); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(c.br, r)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() && r.Context().Err() == nil {
			return nil, errSlow
		}
		return nil, err
	}
	_ = c.SetReadDeadline(time.Time{})
	return resp, nil
}

// errSlow: the sandbox did not send its response's headers in time.
var errSlow = timeoutError{}

type timeoutError struct{}

func (timeoutError) Error() string   { return "the sandbox did not answer in time" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

// bind makes the response's body give the connection back to the pool
// once read to its end (or close it otherwise); a protocol switch (a
// WebSocket) gets the connection itself.
func (p *connPool) bind(resp *http.Response, addr string, c *poolConn) *http.Response {
	if resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Body = &upgraded{Reader: c.br, conn: c}
		return resp
	}
	resp.Body = &pooledBody{body: resp.Body, pool: p, addr: addr, conn: c, keep: !resp.Close}
	return resp
}

type upgraded struct {
	io.Reader
	conn *poolConn
}

func (u *upgraded) Write(b []byte) (int, error) { return u.conn.Write(b) }
func (u *upgraded) Close() error                { return u.conn.Close() }

type pooledBody struct {
	body io.ReadCloser
	pool *connPool
	addr string
	conn *poolConn
	keep bool
	eof  bool
	done bool
}

func (b *pooledBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *pooledBody) Close() error {
	if b.done {
		return nil
	}
	b.done = true
	err := b.body.Close()
	if b.eof && b.keep && err == nil {
		b.pool.put(b.addr, b.conn)
		return nil
	}
	b.conn.Close()
	return err
}
