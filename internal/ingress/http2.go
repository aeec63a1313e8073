package ingress

import (
	"context"
	"io"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync"
	"time"
)

// http2Proxy is the HTTP/2 front end (h2c and h2 over TLS, which fasthttp
// does not speak): net/http's ReverseProxy, to sandboxes over HTTP/1.1
// through one net/http Transport; each request's wait for the response's
// headers is bounded by its target's timeout (a Route's timeoutSeconds).
type http2Proxy struct {
	p  *Proxy
	tr *http.Transport
	rp *httputil.ReverseProxy
}

type targetKey struct{}

func newHTTP2Proxy(parent *Proxy, dial Dialer) *http2Proxy {
	p := &http2Proxy{p: parent, tr: &http.Transport{
		DialContext:            dial,
		MaxIdleConns:           maxIdle,
		MaxIdleConnsPerHost:    maxIdlePerTarget,
		IdleConnTimeout:        poolIdle,
		MaxResponseHeaderBytes: maxHeaderBytes,
		DisableCompression:     true,
	}}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(targetKey{}).(Target)
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", t.Addr
			// The path routes matched, as the HTTP/1.1 front end sends it.
			pr.Out.URL.Path, pr.Out.URL.RawPath = cleanPath(pr.In.URL.Path), ""
			pr.Out.Host = pr.In.Host
			for _, name := range t.Strip {
				pr.Out.Header.Del(name)
			}
			pr.SetXForwarded()
		},
		Transport: p,
		// Without a pool ReverseProxy allocates (and zeroes) 32 KiB per
		// response.
		BufferPool: &bufferPool{},
		// FlushInterval 0: ReverseProxy flushes at once for streams of
		// unknown length and event streams, and lets whole responses go
		// out in one write.
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				return // the client went away
			}
			t, _ := r.Context().Value(targetKey{}).(Target)
			refuse(w, parent.failed(t, err))
		},
	}
	return p
}

func (p *http2Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		refuse(w, &Refusal{Code: http.StatusMethodNotAllowed, Msg: "CONNECT is not served"})
		return
	}
	t, no := p.p.resolver.Resolve(r.Context(), Request{
		Host:   hostOnly(r.Host),
		Path:   cleanPath(r.URL.Path),
		Header: r.Header.Get,
	})
	if no != nil {
		refuse(w, no)
		return
	}
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), targetKey{}, t)))
}

// RoundTrip sends a request to its target, its response's headers within
// the target's timeout. (One Transport serves every timeout: routes choose
// theirs freely, and a Transport per value would grow with them.)
func (p *http2Proxy) RoundTrip(r *http.Request) (*http.Response, error) {
	t, _ := r.Context().Value(targetKey{}).(Target)
	if t.Timeout <= 0 {
		return p.tr.RoundTrip(r)
	}
	ctx, cancel := context.WithCancel(r.Context())
	slow := time.AfterFunc(t.Timeout, cancel)
	resp, err := p.tr.RoundTrip(r.WithContext(ctx))
	if !slow.Stop() { // the headers came too late, if at all
		if err == nil {
			resp.Body.Close()
		}
		cancel()
		return nil, timeoutError{}
	}
	if err != nil {
		cancel()
		return nil, err
	}
	// The body streams within the request's own context from here on.
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

// cancelOnClose ends a response's context with its body.
type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelOnClose) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// timeoutError: the sandbox did not send its response's headers in time.
type timeoutError struct{}

func (timeoutError) Error() string { return "the sandbox did not answer in time" }
func (timeoutError) Timeout() bool { return true }

func refuse(w http.ResponseWriter, no *Refusal) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	if no.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(no.RetryAfter))
	}
	w.WriteHeader(no.Code)
	_, _ = w.Write([]byte(refusalBody(no)))
}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(v []byte) { b.p.Put(&v) }
