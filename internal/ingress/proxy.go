// Package ingress is hearth's L7 proxy: it serves HTTP/1.1, HTTP/2 (h2 over
// TLS, h2c with prior knowledge), WebSocket and TLS by SNI, and sends each
// request to the sandbox its host name names (PORT-SANDBOX-NAMESPACE.DOMAIN)
// or a Route object picks, on whichever host runs it.
//
// The data path (Proxy) is net/http's ReverseProxy over one pooled
// transport; where requests go is a Resolver's answer, so that the
// benchmark measures the same path against a fixed backend.
package ingress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"sync/atomic"
	"time"
)

// Target is where a request goes.
type Target struct {
	Addr string // host:port
	// Timeout bounds the wait for the response's headers (0: none).
	Timeout time.Duration
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

// Resolver decides where a request goes, or refuses it.
type Resolver interface {
	Resolve(r *http.Request) (Target, *Refusal)
}

type targetKey struct{}

// Proxy forwards requests to their targets.
type Proxy struct {
	resolver Resolver
	rp       *httputil.ReverseProxy
}

// errTooSlow means the target did not answer within its timeout.
var errTooSlow = errors.New("the sandbox did not answer in time")

// NewProxy makes a proxy that asks resolver where requests go.
func NewProxy(resolver Resolver) *Proxy {
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     90 * time.Second,
		// Sandboxes speak HTTP/1.1 to the proxy; what the client speaks
		// (h2, h2c) ends here.
		ForceAttemptHTTP2: false,
	}
	p := &Proxy{resolver: resolver}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(targetKey{}).(Target)
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", t.Addr
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport:     timeoutTransport{transport},
		FlushInterval: -1, // stream: server-sent events, long polls
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(err, errTooSlow) {
				refuse(w, &Refusal{Code: http.StatusGatewayTimeout, Msg: "the sandbox did not answer in time"})
				return
			}
			if r.Context().Err() != nil {
				return // the client went away
			}
			refuse(w, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("the sandbox could not be reached: %v", errors.Unwrap(err))})
		},
	}
	return p
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t, no := p.resolver.Resolve(r)
	if no != nil {
		refuse(w, no)
		return
	}
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), targetKey{}, t)))
}

func refuse(w http.ResponseWriter, no *Refusal) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	if no.RetryAfter > 0 {
		h.Set("Retry-After", fmt.Sprint(no.RetryAfter))
	}
	w.WriteHeader(no.Code)
	fmt.Fprintf(w, "%d %s: %s\n", no.Code, http.StatusText(no.Code), no.Msg)
}

// timeoutTransport bounds the wait for a response's headers by the
// target's timeout, and nothing after them (a stream, a WebSocket).
type timeoutTransport struct{ rt http.RoundTripper }

func (t timeoutTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	target, _ := r.Context().Value(targetKey{}).(Target)
	if target.Timeout <= 0 {
		return t.rt.RoundTrip(r)
	}
	ctx, cancel := context.WithCancel(r.Context())
	var late atomic.Bool
	timer := time.AfterFunc(target.Timeout, func() { late.Store(true); cancel() })
	resp, err := t.rt.RoundTrip(r.WithContext(ctx))
	if !timer.Stop() && late.Load() {
		if err == nil {
			resp.Body.Close()
		}
		cancel()
		return nil, errTooSlow
	}
	if err != nil {
		cancel()
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// A WebSocket: ReverseProxy needs the body's Write; the request's
		// own context ends this one when the handler returns.
		return resp, nil
	}
	resp.Body = cancelOnClose{resp.Body, cancel}
	return resp, nil
}

type cancelOnClose struct {
	body interface {
		Read([]byte) (int, error)
		Close() error
	}
	cancel context.CancelFunc
}

func (c cancelOnClose) Read(p []byte) (int, error) { return c.body.Read(p) }

func (c cancelOnClose) Close() error {
	err := c.body.Close()
	c.cancel()
	return err
}
