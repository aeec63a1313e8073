// Package ingress is hearth's L7 proxy: it serves HTTP/1.1, HTTP/2 (h2 over
// TLS, h2c with prior knowledge), WebSocket and TLS by SNI, and sends each
// request to the sandbox its host name names (PORT-SANDBOX-NAMESPACE.DOMAIN)
// or a Route object picks, on whichever host runs it.
//
// Two front ends share one Resolver (where a request goes) and the same
// rules for what is passed on:
//   - HTTP/1.1, plain or over TLS, the hot path: fasthttp's server and
//     header parser, and a client of our own over kept-alive connections
//     to the sandboxes with fasthttp's framing (http1.go, backend.go).
//     net/http's server and ReverseProxy cost twice nginx's CPU per request
//     here (hearth bench ingress: 0.53 of nginx's throughput); fasthttp
//     parses into reused buffers and allocates nothing per request.
//   - HTTP/2 (h2c and h2 by ALPN), which fasthttp does not speak: net/http's
//     server and ReverseProxy (http2.go).
//
// Serve (listen.go) tells the two apart per connection: the HTTP/2 preface
// or the ALPN protocol.
package ingress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path"
	"runtime/debug"
	"strings"
	"time"
)

// Target is where a request goes.
type Target struct {
	Addr string // host:port
	// Timeout bounds the wait for the response's headers (0: none).
	Timeout time.Duration
	// Strip are request headers not to pass on (an access token the
	// ingress checked).
	Strip []string
}

// Refusal is a request the proxy answers itself: a status code and a
// plain message.
type Refusal struct {
	Code int
	Msg  string
	// RetryAfter, in seconds, for a 503.
	RetryAfter int
}

func (r *Refusal) Error() string { return r.Msg }

// Request is what a Resolver reads of a request, the same from both front
// ends.
type Request struct {
	// Host is the host name, lower case, without port or trailing dot.
	Host string
	// Path is the request's path, percent-decoded and without dot
	// segments or repeated slashes: what routes match and what the sandbox
	// is sent, so that the two cannot disagree (/x/../private is /private
	// for both).
	Path string
	// Header returns a request header's value ("" if none).
	Header func(name string) string
}

// Resolver decides where a request goes, or refuses it.
type Resolver interface {
	Resolve(ctx context.Context, r Request) (Target, *Refusal)
}

// Dialer connects to targets.
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// Limits on what the ingress reads from clients and sandboxes. A sandbox
// is the attacker's: its response headers are read into a bounded buffer,
// within the target's timeout.
const (
	// maxHeaderBytes bounds a request's or a response's header block; it is
	// also the size of each connection's read buffer (nginx's default
	// for an upstream's headers is 4 or 8 KiB).
	maxHeaderBytes = 16 << 10
	// headerTimeout bounds a client's request headers, and a new
	// connection's TLS handshake or first bytes.
	headerTimeout = 30 * time.Second
	// bodyTimeout bounds reading a request's body (an upload).
	bodyTimeout = time.Hour
	// idleTimeout closes a client's kept-alive connection with no
	// request (those to sandboxes: poolIdle, backend.go).
	idleTimeout = 90 * time.Second
)

// Proxy forwards requests to their targets.
type Proxy struct {
	resolver Resolver
	backend  *backend
	h2       http.Handler
	log      *slog.Logger
	upgrades *upgrades
}

// NewProxy makes a proxy that asks resolver where requests go and dials
// them with dial (nil: a plain dialer); it logs to log.
func NewProxy(resolver Resolver, dial Dialer, log *slog.Logger) *Proxy {
	if dial == nil {
		dial = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	p := &Proxy{resolver: resolver, backend: &backend{dial: dial}, log: log,
		upgrades: newUpgrades()}
	p.h2 = newHTTP2Proxy(p, dial)
	return p
}

// hopHeaders are meaningful for one connection only, never passed on
// (RFC 9110 7.6.1), with those a Connection header names.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// connectionListed calls del for each header a Connection header value
// names.
func connectionListed(v string, del func(string)) {
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			del(f)
		}
	}
}

// cleanPath is p without dot segments or repeated slashes, keeping a
// trailing slash, as fasthttp normalizes HTTP/1.1 paths.
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	c := path.Clean("/" + p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c
}

// hostOnly is a Host header's host name: no port, lower case, no
// trailing dot.
func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		hostport = h
	}
	return strings.ToLower(strings.TrimSuffix(hostport, "."))
}

// refusalBody is the plain text of a refusal.
func refusalBody(no *Refusal) string {
	return fmt.Sprintf("%d %s: %s\n", no.Code, http.StatusText(no.Code), no.Msg)
}

// failed is the answer for a target that could not be reached or did not
// answer in time (or answered what cannot be passed on). The client gets
// the kind of failure; the details (addresses, system errors) go to the
// log.
func (p *Proxy) failed(t Target, err error) *Refusal {
	p.log.Debug("ingress: sandbox failed", "target", t.Addr, "err", err)
	if isTimeout(err) {
		return &Refusal{Code: http.StatusGatewayTimeout, Msg: "the sandbox did not answer in time"}
	}
	return &Refusal{Code: http.StatusBadGateway, Msg: "the sandbox could not be reached, or its answer could not be passed on"}
}

// isTimeout reports a deadline's error: net's, or fasthttp's (which has
// no Temporary method, so it is not a net.Error).
func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// TuneGC trades memory for throughput in a process that is an ingress and
// nothing else: at Go's default GC target a third of the net/http proxy's
// CPU went to collecting its per-request garbage (hearth bench ingress:
// 7k → 10k requests/s on 2 cores). fasthttp's path allocates little, but
// the HTTP/2 path and the API caches still do; the live heap is small.
func TuneGC() { debug.SetGCPercent(400) }
