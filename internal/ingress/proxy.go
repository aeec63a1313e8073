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
	"runtime/debug"
	"sync"
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

// Dialer connects to targets.
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// NewProxy makes a proxy that asks resolver where requests go and dials
// them with dial (nil: a plain dialer; the benchmark's reaches into a
// network namespace).
func NewProxy(resolver Resolver, dial Dialer) *Proxy {
	if dial == nil {
		dial = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	p := &Proxy{resolver: resolver}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(targetKey{}).(Target)
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", t.Addr
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport: transport{&connPool{dial: dial}},
		// Without a pool ReverseProxy allocates (and zeroes) 32 KiB per
		// response: 13% of its CPU under load.
		BufferPool: &bufferPool{},
		// FlushInterval 0: ReverseProxy flushes at once for streams of
		// unknown length and event streams, and lets whole responses go
		// out in one write (-1 here halved throughput).
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
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

// transport sends each request to its target through the pool.
type transport struct{ pool *connPool }

func (t transport) RoundTrip(r *http.Request) (*http.Response, error) {
	target, _ := r.Context().Value(targetKey{}).(Target)
	return t.pool.roundTrip(r, target.Addr, target.Timeout)
}

// TuneGC trades memory for throughput in a process that is an ingress and
// nothing else: the proxy allocates a few KiB per request, all garbage at
// once, and at Go's default GC target a third of its CPU went to
// collecting it (hearth bench ingress: 7k → 10k requests/s on 2 cores).
// Its live heap is small, so four times more headroom is cheap.
func TuneGC() { debug.SetGCPercent(400) }

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(v []byte) { b.p.Put(&v) }
