package ingress

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// h2Preface opens every HTTP/2 connection (RFC 9113 3.4).
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// Serve serves p on ln until ctx ends: each connection goes to the HTTP/1.1
// front end (fasthttp) or, if it opens with the HTTP/2 preface (h2c) or
// negotiates h2 by ALPN, to the HTTP/2 one (net/http). With tlsConfig,
// connections are TLS; its NextProtos should offer h2 and http/1.1.
func Serve(ctx context.Context, ln net.Listener, tlsConfig *tls.Config, p *Proxy, log *slog.Logger) error {
	h1q, h2q := newConnQueue(ln.Addr()), newConnQueue(ln.Addr())
	h1 := newHTTP1Server(p, func(format string, args ...any) { log.Debug("ingress http/1.1: " + fmt.Sprintf(format, args...)) })
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(true)
	h2 := &http.Server{Handler: p.h2, Protocols: protocols, ReadHeaderTimeout: headerTimeout, IdleTimeout: idleTimeout,
		MaxHeaderBytes: maxHeaderBytes, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}

	errc := make(chan error, 3)
	go func() { errc <- h1.Serve(h1q) }()
	go func() { errc <- h2.Serve(h2q) }()
	go func() {
		var backoff time.Duration
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
					errc <- nil
					return
				}
				// Out of descriptors (EMFILE, ENFILE) or a connection that
				// went before it was taken: wait and go on, as net/http
				// does. One client's flood must not end the ingress (and
				// with it every role of the process).
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				log.Warn("ingress: accept", "err", err, "retry in", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
				}
				continue
			}
			backoff = 0
			go func() {
				c, toH2, err := sniff(ctx, c, tlsConfig)
				if err != nil {
					log.Debug("ingress: connection", "remote", c.RemoteAddr(), "err", err)
					c.Close()
					return
				}
				if toH2 {
					h2q.push(c)
				} else {
					h1q.push(c)
				}
			}()
		}
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	ln.Close()
	h1q.Close()
	h2q.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = errors.Join(err, h1.ShutdownWithContext(sctx), h2.Shutdown(sctx))
	if errors.Is(err, net.ErrClosed) || errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// sniff finds which front end c goes to: for TLS, after the handshake, by
// ALPN; in the clear, by whether its first bytes are the HTTP/2 preface
// (the bytes read are given back to whoever reads the returned conn).
// Both within headerTimeout.
func sniff(ctx context.Context, c net.Conn, tlsConfig *tls.Config) (net.Conn, bool, error) {
	_ = c.SetDeadline(time.Now().Add(headerTimeout))
	defer c.SetDeadline(time.Time{})
	if tlsConfig != nil {
		tc := tls.Server(c, tlsConfig)
		if err := tc.HandshakeContext(ctx); err != nil {
			return c, false, fmt.Errorf("TLS handshake: %w", err)
		}
		return tc, tc.ConnectionState().NegotiatedProtocol == "h2", nil
	}
	buf := make([]byte, len(h2Preface))
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if !bytes.HasPrefix([]byte(h2Preface), buf[:n]) {
			break // HTTP/1.1 (or not HTTP at all: fasthttp answers)
		}
		if err != nil {
			return c, false, err
		}
	}
	return &prefixConn{Conn: c, prefix: buf[:n]}, n == len(h2Preface) && string(buf) == h2Preface, nil
}

// prefixConn reads prefix before the rest of its connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// connQueue is a net.Listener whose connections are pushed to it, the
// way Serve hands each front end its connections.
type connQueue struct {
	addr   net.Addr
	ch     chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func newConnQueue(addr net.Addr) *connQueue {
	return &connQueue{addr: addr, ch: make(chan net.Conn), closed: make(chan struct{})}
}

func (q *connQueue) push(c net.Conn) {
	select {
	case q.ch <- c:
	case <-q.closed:
		c.Close()
	}
}

func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.closed:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.closed) })
	return nil
}

func (q *connQueue) Addr() net.Addr { return q.addr }
