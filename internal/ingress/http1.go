package ingress

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"iter"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http/httpguts"
)

// newHTTP1Server is the HTTP/1.1 front end: fasthttp's server, bounded as
// the net/http one was (headers within headerTimeout and maxHeaderBytes),
// passing bodies through as streams.
func newHTTP1Server(p *Proxy, logf func(string, ...any)) *fasthttp.Server {
	return &fasthttp.Server{
		Handler: p.serveHTTP1,
		// Headers up to maxHeaderBytes (the read buffer's size), within
		// headerTimeout; then an upload has bodyTimeout.
		ReadBufferSize: maxHeaderBytes,
		ReadTimeout:    headerTimeout,
		HeaderReceived: func(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
			if n := h.ContentLength(); n == 0 || n == -2 {
				return fasthttp.RequestConfig{} // no body: no deadline to move
			}
			return fasthttp.RequestConfig{ReadTimeout: bodyTimeout}
		},
		IdleTimeout: idleTimeout,
		// Bodies stream to the sandbox: up to MaxRequestBodySize is read
		// before the handler runs, the rest as the sandbox takes it.
		StreamRequestBody:  true,
		MaxRequestBodySize: 64 << 10,
		// A proxy passes multipart bodies through, it does not parse them
		// into temporary files.
		DisablePreParseMultipartForm: true,
		// No Server or Content-Type of ours (the sandbox's, if any); the
		// Date is the ingress's.
		NoDefaultServerHeader: true,
		NoDefaultDate:         true,
		NoDefaultContentType:  true,
		// Header names are normalized (x-foo: X-Foo, the same name to
		// HTTP), so that Peek and Del find them whatever their case.
		DisableHeaderNamesNormalizing: false,
		SecureErrorLogMessage:         true,
		CloseOnShutdown:               true,
		Logger:                        fasthttpLogger(logf),
	}
}

type fasthttpLogger func(string, ...any)

func (l fasthttpLogger) Printf(format string, args ...any) { l(format, args...) }

// serveHTTP1 proxies one HTTP/1.1 request.
func (p *Proxy) serveHTTP1(ctx *fasthttp.RequestCtx) {
	req := &ctx.Request
	if req.Header.IsConnect() {
		// A tunnel is not a request to a sandbox; and fasthttp would send
		// CONNECT's path as received, not as routes matched it.
		refuseHTTP1(ctx, &Refusal{Code: fasthttp.StatusMethodNotAllowed, Msg: "CONNECT is not served"})
		return
	}
	t, no := p.resolver.Resolve(ctx, Request{
		Host: hostOnly(string(ctx.Host())),
		Path: string(ctx.Path()), // fasthttp's normalized path, which req.Write sends
		Header: func(name string) string {
			return string(req.Header.Peek(name))
		},
	})
	if no != nil {
		refuseHTTP1(ctx, no)
		return
	}
	// Upgrades pass on, but for h2c: that one would tunnel HTTP/2 requests
	// past the routes and their tokens; it is dropped (the request goes
	// on as HTTP/1.1).
	upgrade := req.Header.ConnectionUpgrade() && len(req.Header.Peek("Upgrade")) > 0 &&
		!strings.EqualFold(strings.TrimSpace(string(req.Header.Peek("Upgrade"))), "h2c")
	if !prepareHTTP1(ctx, t, upgrade) {
		refuseHTTP1(ctx, &Refusal{Code: fasthttp.StatusBadRequest, Msg: "a header name is not a token"})
		return
	}
	if upgrade {
		p.upgrade(ctx, t)
		return
	}
	if err := p.backend.roundTrip(ctx, req, &ctx.Response, t); err != nil {
		ctx.Response.Reset()
		refuseHTTP1(ctx, p.failed(t, err))
		return
	}
	if !cleanResponse(&ctx.Response.Header) {
		ctx.Response.Reset()
		refuseHTTP1(ctx, p.failed(t, errBadHeader))
	}
}

// prepareHTTP1 makes the request the sandbox gets: without hop-by-hop
// headers (but for an upgrade's own), with X-Forwarded-For, -Host and
// -Proto as the ingress saw them (a client's own, every copy, are
// replaced), without what the target strips, and without credentials in
// an absolute-form URI (fasthttp would make them an Authorization). It
// reports false if a header's name is not a token.
func prepareHTTP1(ctx *fasthttp.RequestCtx, t Target, upgrade bool) bool {
	h := &ctx.Request.Header
	host := string(ctx.Host())
	var protocol []byte
	if upgrade {
		protocol = append(protocol, h.Peek("Upgrade")...)
	}
	for _, name := range t.Strip {
		h.Del(name)
	}
	if !dropHopHeaders(h.All(), h.Del) {
		return false
	}
	ctx.Request.URI().SetUsername("")
	ctx.Request.URI().SetPassword("")
	ctx.Request.Header.SetNoDefaultContentType(true)
	// The client's Connection: close is the client's; the server still
	// honors it (it read it before this handler).
	h.ResetConnectionClose()
	if upgrade {
		h.Set("Connection", "Upgrade")
		h.SetBytesV("Upgrade", protocol)
	}
	proto := "http"
	if ctx.IsTLS() {
		proto = "https"
	}
	// Del first: Set replaces only the first of repeated headers.
	for _, kv := range [...][2]string{{"X-Forwarded-For", ctx.RemoteIP().String()}, {"X-Forwarded-Host", host}, {"X-Forwarded-Proto", proto}} {
		h.Del(kv[0])
		h.Set(kv[0], kv[1])
	}
	return true
}

// cleanResponse drops the sandbox's hop-by-hop headers; the front end
// frames the body and decides about the client's connection itself. It
// reports false if a header's name is not a token.
func cleanResponse(h *fasthttp.ResponseHeader) bool {
	if !dropHopHeaders(h.All(), h.Del) {
		return false
	}
	h.ResetConnectionClose()
	return true
}

// errBadHeader: the sandbox sent a header whose name is not a token.
var errBadHeader = errors.New("a response header's name is not a token")

// dropHopHeaders deletes the hop-by-hop headers among all, and those a
// Connection header names; it reports false if a header's name is not a
// token (fasthttp takes "X Y: z", net/http and most servers do not). Most
// messages have no hop-by-hop header: one pass over the headers finds
// them, instead of a lookup per name.
func dropHopHeaders(all iter.Seq2[[]byte, []byte], del func(string)) bool {
	var found []string
	for k, v := range all {
		if len(k) == 0 {
			return false
		}
		for _, b := range k {
			if !httpguts.IsTokenRune(rune(b)) {
				return false
			}
		}
		for i, name := range hopHeaderBytes {
			if len(k) == len(name) && bytes.EqualFold(k, name) {
				found = append(found, hopHeaders[i])
				if i == 0 { // Connection
					connectionListed(string(v), func(n string) { found = append(found, n) })
				}
				break
			}
		}
	}
	for _, name := range found {
		del(name)
	}
	return true
}

// hopHeaderBytes are hopHeaders as bytes, to compare without converting.
var hopHeaderBytes = func() [][]byte {
	bs := make([][]byte, len(hopHeaders))
	for i, h := range hopHeaders {
		bs[i] = []byte(h)
	}
	return bs
}()

func refuseHTTP1(ctx *fasthttp.RequestCtx, no *Refusal) {
	ctx.Response.Header.Set("Content-Type", "text/plain; charset=utf-8")
	ctx.Response.Header.Set("X-Content-Type-Options", "nosniff")
	if no.RetryAfter > 0 {
		ctx.Response.Header.Set("Retry-After", strconv.Itoa(no.RetryAfter))
	}
	ctx.SetStatusCode(no.Code)
	ctx.SetBodyString(refusalBody(no))
}

// upgrade passes a protocol switch (a WebSocket) on: the request goes to
// the sandbox on a connection of its own; if it answers 101, the client's
// connection and that one are joined byte for byte until either ends;
// any other answer is passed back as a response.
func (p *Proxy) upgrade(ctx *fasthttp.RequestCtx, t Target) {
	release, no := p.upgrades.acquire(t.Addr, ctx.RemoteIP().String())
	if no != nil {
		refuseHTTP1(ctx, no)
		return
	}
	joined := false
	defer func() {
		if !joined {
			release()
		}
	}()
	c, err := p.backend.dial(ctx, "tcp", t.Addr)
	if err != nil {
		refuseHTTP1(ctx, p.failed(t, err))
		return
	}
	bc := newBackendConn(c)
	if t.Timeout > 0 {
		_ = c.SetReadDeadline(time.Now().Add(t.Timeout))
	}
	if err := ctx.Request.Write(bc.bw); err == nil {
		err = bc.bw.Flush()
	}
	in := fasthttp.AcquireResponse()
	in.StreamBody = true
	if err == nil {
		// A 101 has no body: what the sandbox sent after it stays in bc.br.
		err = in.Read(bc.br)
	}
	if err != nil {
		fasthttp.ReleaseResponse(in)
		c.Close()
		refuseHTTP1(ctx, p.failed(t, err))
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if in.StatusCode() != fasthttp.StatusSwitchingProtocols {
		// Refused: passed back as any response, and the connection closed
		// after it.
		p.backend.passOn(in, &ctx.Response, bc, t.Addr, false)
		if !cleanResponse(&ctx.Response.Header) {
			ctx.Response.Reset()
			refuseHTTP1(ctx, p.failed(t, errBadHeader))
		}
		return
	}
	head := append([]byte(nil), in.Header.Header()...)
	fasthttp.ReleaseResponse(in)
	ctx.HijackSetNoResponse(true)
	joined = true
	// fasthttp calls a hijack handler only once it has flushed what it
	// holds for the client's connection; when that fails it drops the
	// handler without a call. The sandbox's connection and the slot are
	// then let go after hijackWait, not held for ever.
	giveUp := time.AfterFunc(hijackWait, func() {
		c.Close()
		release()
	})
	ctx.Hijack(func(client net.Conn) {
		if !giveUp.Stop() {
			return
		}
		defer release()
		defer c.Close()
		_ = client.SetDeadline(time.Time{})
		if _, err := client.Write(head); err != nil {
			return
		}
		join(client, c, bc.br, p.upgrades.idle)
	})
}

// join copies both ways between a client's connection and a sandbox's
// (whose bytes come through br) until either ends, or until nothing has
// moved either way for idle: a connection one side left open, or that
// sends nothing, is not held for ever.
func join(client, sandbox net.Conn, br io.Reader, idle time.Duration) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	pipe := func(dst, src net.Conn, r io.Reader) {
		buf := make([]byte, 32<<10)
		for {
			_ = src.SetReadDeadline(time.Now().Add(idle))
			n, err := r.Read(buf)
			if n > 0 {
				last.Store(time.Now().UnixNano())
				_ = dst.SetWriteDeadline(time.Now().Add(idle))
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				// Silent this way, but the other moved: wait on.
				if isTimeout(err) && time.Since(time.Unix(0, last.Load())) < idle {
					continue
				}
				return
			}
		}
	}
	done := make(chan struct{})
	go func() {
		pipe(client, sandbox, br)
		client.Close()
		close(done)
	}()
	pipe(sandbox, client, client)
	sandbox.Close()
	<-done
}

// upgrades bounds upgraded connections (WebSockets): how many are open to
// one sandbox port, from one client address and in all, and how long one
// may be silent both ways.
type upgrades struct {
	perTarget, perClient, total int
	idle                        time.Duration

	mu       sync.Mutex
	byTarget map[string]int
	byClient map[string]int
	n        int
}

// Defaults: a sandbox port holds up to 256 WebSockets through an ingress,
// a client address 256, the ingress 4,096 (each costs two connections and
// two goroutines).
const (
	maxUpgradesPerTarget = 256
	maxUpgradesPerClient = 256
	maxUpgrades          = 4096
	// hijackWait is how long an upgrade answered 101 waits for fasthttp to
	// hand over the client's connection.
	hijackWait = 30 * time.Second
)

func newUpgrades() *upgrades {
	return &upgrades{perTarget: maxUpgradesPerTarget, perClient: maxUpgradesPerClient, total: maxUpgrades, idle: streamIdle,
		byTarget: map[string]int{}, byClient: map[string]int{}}
}

// acquire takes a slot for an upgrade from client to target, or says why
// not; release gives it back (once, however often it is called).
func (u *upgrades) acquire(target, client string) (release func(), no *Refusal) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.byTarget[target] >= u.perTarget:
		return nil, &Refusal{Code: http.StatusServiceUnavailable, RetryAfter: 5,
			Msg: fmt.Sprintf("this sandbox port has %d upgraded connections open, the most it may", u.perTarget)}
	case u.byClient[client] >= u.perClient:
		return nil, &Refusal{Code: http.StatusServiceUnavailable, RetryAfter: 5,
			Msg: fmt.Sprintf("your address has %d upgraded connections open through this ingress, the most it may", u.perClient)}
	case u.n >= u.total:
		return nil, &Refusal{Code: http.StatusServiceUnavailable, RetryAfter: 5, Msg: "the ingress has as many upgraded connections open as it may"}
	}
	u.byTarget[target]++
	u.byClient[client]++
	u.n++
	var once sync.Once
	return func() {
		once.Do(func() {
			u.mu.Lock()
			defer u.mu.Unlock()
			u.n--
			decrement(u.byTarget, target)
			decrement(u.byClient, client)
		})
	}, nil
}

func decrement(m map[string]int, k string) {
	if m[k]--; m[k] <= 0 {
		delete(m, k)
	}
}
