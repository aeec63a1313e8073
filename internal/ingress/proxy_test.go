package ingress

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/valyala/fasthttp"

	"hearth.dev/hearth/internal/pki"
)

// testResolver sends every host to one backend, but for a few names.
type testResolver struct{ backend, huge string }

func (r testResolver) Resolve(_ context.Context, req Request) (Target, *Refusal) {
	switch req.Host {
	case "huge.test":
		return Target{Addr: r.huge, Timeout: 5 * time.Second}, nil
	case "refused.test":
		return Target{}, &Refusal{Code: http.StatusNotFound, Msg: "no route for host " + req.Host}
	case "down.test":
		return Target{Addr: "127.0.0.1:1", Timeout: time.Second}, nil
	case "slow.test":
		return Target{Addr: r.backend, Timeout: 200 * time.Millisecond}, nil
	case "token.test":
		if req.Header("Authorization") != "Bearer s3cret" {
			return Target{}, &Refusal{Code: http.StatusUnauthorized, Msg: "wrong access token"}
		}
		return Target{Addr: r.backend, Timeout: 5 * time.Second, Strip: []string{"Authorization"}}, nil
	case "private.test":
		// A route whose prefix /private needs a token: the path is the
		// normalized one.
		if strings.HasPrefix(req.Path, "/private") {
			return Target{}, &Refusal{Code: http.StatusUnauthorized, Msg: "private"}
		}
	}
	return Target{Addr: r.backend, Timeout: 5 * time.Second}, nil
}

type fixture struct {
	proxy         *Proxy
	plain, secure string
	backendConns  atomic.Int64
	release       chan struct{}
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{release: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Connection", "X-Backend-Hop")
		w.Header().Set("X-Backend-Hop", "1")
		fmt.Fprintf(w, "%s %s host=%s xff=%s xfp=%s xfh=%s auth=%q hop=%q te=%q body=%d:%s",
			r.Method, r.URL.RequestURI(), r.Host, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"),
			r.Header.Get("X-Forwarded-Host"), r.Header.Get("Authorization"), r.Header.Get("X-Client-Hop"),
			r.Header.Get("Te"), n, hex.EncodeToString(h.Sum(nil))[:12])
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-f.release:
		case <-r.Context().Done():
			return
		}
		fmt.Fprint(w, "data: two\n\n")
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(3 * time.Second):
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("/big-header", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Big", strings.Repeat("a", 2*maxHeaderBytes))
	})
	mux.HandleFunc("/head", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1234")
		if r.Method != http.MethodHead {
			_, _ = w.Write(make([]byte, 1234))
		}
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, b, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, append([]byte("echo "), b...)); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/ws-refused", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no upgrade for you", http.StatusForbidden)
	})
	be := httptest.NewUnstartedServer(mux)
	be.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			f.backendConns.Add(1)
		}
	}
	be.Start()
	t.Cleanup(be.Close)

	ctx, cancel := context.WithCancel(context.Background())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := NewProxy(testResolver{backend: be.Listener.Addr().String(), huge: hugeHeaders(t)}, nil, log)
	f.proxy = p
	certPEM, keyPEM, err := pki.SelfSigned([]string{"ingress.test"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	for _, tc := range []struct {
		addr *string
		tls  *tls.Config
	}{{&f.plain, nil}, {&f.secure, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}}} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		*tc.addr = ln.Addr().String()
		go func() { done <- Serve(ctx, ln, tc.tls, p, log) }()
	}
	t.Cleanup(func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		}
	})
	return f
}

// clients: HTTP/1.1 and h2c in the clear, h2 and HTTP/1.1 over TLS.
func (f *fixture) clients() map[string]struct {
	c    *http.Client
	base string
	h2   bool
} {
	h2c := new(http.Protocols)
	h2c.SetUnencryptedHTTP2(true)
	// A config each: net/http adds h2 to a transport's NextProtos in place.
	insecure := func() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }
	return map[string]struct {
		c    *http.Client
		base string
		h2   bool
	}{
		"http1":     {&http.Client{Transport: &http.Transport{}}, "http://" + f.plain, false},
		"h2c":       {&http.Client{Transport: &http.Transport{Protocols: h2c}}, "http://" + f.plain, true},
		"h2-tls":    {&http.Client{Transport: &http.Transport{TLSClientConfig: insecure(), ForceAttemptHTTP2: true}}, "https://" + f.secure, true},
		"http1-tls": {&http.Client{Transport: &http.Transport{TLSClientConfig: insecure(), TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}, "https://" + f.secure, false},
	}
}

func do(t *testing.T, c *http.Client, method, url, host string, body io.Reader, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s (%s): %v", method, url, host, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s (%s): reading the body: %v", method, url, host, err)
	}
	return resp, string(b)
}

func TestProxyFrontEnds(t *testing.T) {
	f := newFixture(t)
	for name, cl := range f.clients() {
		t.Run(name, func(t *testing.T) {
			proto := "http"
			if strings.HasPrefix(cl.base, "https") {
				proto = "https"
			}
			resp, body := do(t, cl.c, "GET", cl.base+"/a/b?q=1", "app.test:8480", nil,
				"X-Forwarded-For", "6.6.6.6", "X-Forwarded-Proto", "gopher", "Te", "trailers")
			if (resp.ProtoMajor == 2) != cl.h2 {
				t.Errorf("answered over %s", resp.Proto)
			}
			// TE: trailers stays over HTTP/2, whose front end passes
			// trailers on; the HTTP/1.1 one does not.
			te := ""
			if cl.h2 {
				te = "trailers"
			}
			want := fmt.Sprintf("GET /a/b?q=1 host=app.test:8480 xff=127.0.0.1 xfp=%s xfh=app.test:8480 auth=\"\" hop=\"\" te=%q body=0:", proto, te)
			if resp.StatusCode != 200 || !strings.HasPrefix(body, want) {
				t.Errorf("got %d %q\nwant %q", resp.StatusCode, body, want)
			}
			for _, h := range []string{"Keep-Alive", "X-Backend-Hop"} {
				if v := resp.Header.Get(h); v != "" {
					t.Errorf("the sandbox's hop-by-hop %s reached the client: %q", h, v)
				}
			}

			// A body, in both directions, checked by its hash; large
			// enough to stream rather than be buffered.
			payload := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
			sum := sha256.Sum256([]byte(payload))
			_, body = do(t, cl.c, "POST", cl.base+"/upload", "app.test", strings.NewReader(payload))
			if want := fmt.Sprintf("body=%d:%s", len(payload), hex.EncodeToString(sum[:])[:12]); !strings.HasSuffix(body, want) {
				t.Errorf("POST of 1 MiB: %q, want the suffix %q", body, want)
			}

			// The token the resolver checked goes no further.
			resp, body = do(t, cl.c, "GET", cl.base+"/", "token.test", nil, "Authorization", "Bearer s3cret")
			if resp.StatusCode != 200 || !strings.Contains(body, `auth=""`) {
				t.Errorf("token route: %d %q", resp.StatusCode, body)
			}

			for _, tc := range []struct {
				host, path string
				code       int
				has        string
			}{
				{"refused.test", "/", 404, "no route for host refused.test"},
				{"token.test", "/", 401, "wrong access token"},
				{"down.test", "/", 502, "could not be reached"},
				{"slow.test", "/slow", 504, "did not answer in time"},
				{"app.test", "/big-header", 502, "could not be reached"},
				{"private.test", "/public/../private/x", 401, "private"},
				{"private.test", "/public//..//private/x", 401, "private"},
			} {
				resp, body := do(t, cl.c, "GET", cl.base+tc.path, tc.host, nil)
				if resp.StatusCode != tc.code || !strings.Contains(body, tc.has) {
					t.Errorf("GET %s%s: %d %q, want %d with %q", tc.host, tc.path, resp.StatusCode, body, tc.code, tc.has)
				}
			}

			resp, body = do(t, cl.c, "HEAD", cl.base+"/head", "app.test", nil)
			if resp.StatusCode != 200 || resp.ContentLength != 1234 || body != "" {
				t.Errorf("HEAD: %d, length %d, body %q", resp.StatusCode, resp.ContentLength, body)
			}
		})
	}
}

// rawClient sends requests exactly as written on one connection to addr
// and reads each response.
func rawClient(t *testing.T, addr string) func(req string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	br := bufio.NewReader(c)
	return func(req string) (*http.Response, string) {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
}

// A raw HTTP/1.1 client: the request line and headers exactly as sent.
func TestProxyHTTP1Raw(t *testing.T) {
	f := newFixture(t)
	send := rawClient(t, f.plain)
	// Headers a Connection header names, and the standard hop-by-hop
	// ones, stay with the client's connection; so does its keep-alive.
	_, body := send("GET /x HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive, X-Client-Hop\r\nX-Client-Hop: 1\r\nTe: trailers\r\n\r\n")
	if !strings.Contains(body, `hop="" te=""`) {
		t.Errorf("hop-by-hop request headers reached the sandbox: %q", body)
	}
	// Absolute form: the URI's host is the host.
	_, body = send("GET http://abs.test/y HTTP/1.1\r\nHost: other.test\r\n\r\n")
	if !strings.Contains(body, "GET /y host=abs.test") {
		t.Errorf("absolute-form request: %q", body)
	}
	// Many requests on one connection reuse the connections to the
	// sandbox.
	before := f.backendConns.Load()
	for range 50 {
		send("GET /z HTTP/1.1\r\nHost: app.test\r\n\r\n")
	}
	if n := f.backendConns.Load() - before; n > 1 {
		t.Errorf("50 requests in a row opened %d connections to the sandbox, want at most 1", n)
	}
	// A header block over the limit is refused, not buffered.
	resp, _ := send("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + strings.Repeat("b", 2*maxHeaderBytes) + "\r\n\r\n")
	if resp.StatusCode < 400 {
		t.Errorf("a %d KiB request header: %d", 2*maxHeaderBytes>>10, resp.StatusCode)
	}
}

func TestProxyStreams(t *testing.T) {
	f := newFixture(t)
	for name, cl := range f.clients() {
		t.Run(name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", cl.base+"/stream", nil)
			req.Host = "app.test"
			resp, err := cl.c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			// The first event arrives while the sandbox still holds the
			// second back: nothing waits for the whole body.
			got := make(chan string, 1)
			go func() {
				l, _ := br.ReadString('\n')
				got <- l
			}()
			select {
			case l := <-got:
				if l != "data: one\n" {
					t.Errorf("first event: %q", l)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the first event did not come through while the stream was open")
			}
		})
	}
	close(f.release)
}

func TestProxyWebSocket(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws://"+f.plain+"/ws", &websocket.DialOptions{Host: "app.test"})
	if err != nil {
		t.Fatalf("WebSocket through the proxy: %v", err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 20)
	for _, msg := range []string{"first", strings.Repeat("x", 100<<10)} {
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		_, b, err := ws.Read(ctx)
		if err != nil || string(b) != "echo "+msg {
			t.Errorf("echo of %d bytes: %d bytes, %v", len(msg), len(b), err)
		}
	}
	ws.Close(websocket.StatusNormalClosure, "")

	// A sandbox that refuses the upgrade: its answer reaches the client.
	_, resp, err := websocket.Dial(ctx, "ws://"+f.plain+"/ws-refused", &websocket.DialOptions{Host: "app.test"})
	if err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("a refused upgrade: %v %v", resp, err)
	}
}

// What a hostile client or sandbox sends that must not get through.
func TestProxyHostileInput(t *testing.T) {
	f := newFixture(t)
	raw := rawClient(t, f.plain)
	send := func(req string) (int, string) {
		t.Helper()
		resp, body := raw(req)
		return resp.StatusCode, body
	}
	// Every copy of a client's X-Forwarded-* is replaced, not only the
	// first (fasthttp's Set replaces one).
	if _, body := send("GET /x HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n" +
		"X-Forwarded-Proto: https\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: a\r\nX-Forwarded-Host: evil.test\r\n\r\n"); !strings.Contains(body, "xff=127.0.0.1 xfp=http xfh=app.test ") {
		t.Errorf("repeated X-Forwarded-* headers: %q", body)
	}
	// Credentials in an absolute-form URI are not made an Authorization.
	if _, body := send("GET http://user:pass@abs.test/y HTTP/1.1\r\nHost: abs.test\r\n\r\n"); !strings.Contains(body, `auth=""`) {
		t.Errorf("absolute-form URI with credentials: %q", body)
	}
	// CONNECT is no request to a sandbox (and its path would go on as sent).
	if code, body := send("CONNECT /private/../public HTTP/1.1\r\nHost: private.test\r\n\r\n"); code != 405 {
		t.Errorf("CONNECT: %d %q, want 405", code, body)
	}
	// h2c upgrades would tunnel requests past the routes: the request goes
	// on as plain HTTP/1.1.
	if code, body := send("GET /h HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"); code != 200 || !strings.HasPrefix(body, "GET /h ") {
		t.Errorf("an h2c upgrade: %d %q, want the request served as HTTP/1.1", code, body)
	}
	// A header name that is not a token.
	if code, _ := send("GET / HTTP/1.1\r\nHost: app.test\r\nX Forwarded For: 1.2.3.4\r\n\r\n"); code != 400 {
		t.Errorf("a header name with spaces: %d, want 400", code)
	}
}

// A sandbox that sends more than the response to a request (a second
// response, a HEAD's body) does not get its connection reused for the
// next request.
func TestProxyBackendExtraBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := conns.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					body := fmt.Sprintf("conn %d %s", n, req.URL.Path)
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%sHTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nNOT-FOR-YOU!", len(body), body)
				}
			}()
		}
	}()
	p := NewProxy(testResolver{backend: ln.Addr().String()}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, pl, nil, p, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	defer func() { cancel(); <-done }()
	client := &http.Client{}
	for _, path := range []string{"/a", "/b", "/c"} {
		_, body := do(t, client, "GET", "http://"+pl.Addr().String()+path, "app.test", nil)
		if !strings.HasSuffix(body, path) {
			t.Errorf("GET %s: %q", path, body)
		}
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("%d connections to the sandbox for 3 requests: one that sent too much was reused", n)
	}
}

// Only idempotent requests without any body are sent again on a new
// connection when a kept-alive one fails.
func TestRetryable(t *testing.T) {
	for _, tc := range []struct {
		req    string
		stream bool // the body streams, as the front end reads a chunked one
		want   bool
	}{
		{"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, true},
		{"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", false, true},
		{"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", true, false},
		{"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", false, false},
		{"POST / HTTP/1.1\r\nHost: a\r\n\r\n", false, false},
	} {
		var req fasthttp.Request
		if err := req.Read(bufio.NewReader(strings.NewReader(tc.req))); err != nil && !tc.stream {
			t.Fatal(err)
		}
		if tc.stream {
			req.SetBodyStream(strings.NewReader("0\r\n\r\n"), -1)
		}
		if got := retryable(&req); got != tc.want {
			t.Errorf("%q: retryable %v, want %v", tc.req, got, tc.want)
		}
	}
}

// A listener whose Accept fails for a while (out of descriptors) does
// not end Serve.
func TestServeSurvivesAcceptErrors(t *testing.T) {
	f := newFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &failingListener{Listener: ln}
	fl.fails.Store(3)
	p := NewProxy(testResolver{backend: f.plain}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, fl, nil, p, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	resp, _ := do(t, &http.Client{Timeout: 10 * time.Second}, "GET", "http://"+ln.Addr().String()+"/", "refused.test", nil)
	if resp.StatusCode != 404 {
		t.Errorf("after accept errors: %d, want the resolver's 404", resp.StatusCode)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

type failingListener struct {
	net.Listener
	fails atomic.Int64
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// hugeHeaders is a sandbox that answers every request with a 1 MiB
// response header, from one buffer.
func hugeHeaders(t *testing.T) string {
	t.Helper()
	resp := []byte("HTTP/1.1 200 OK\r\nX-Huge: " + strings.Repeat("h", 1<<20) + "\r\nContent-Length: 0\r\n\r\n")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				if _, err := c.Read(buf); err == nil {
					_, _ = c.Write(resp)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// A sandbox's 1 MiB response header is a 502, on both front ends, and is
// not held: the ingress's heap does not grow with such answers.
func TestProxyHugeResponseHeader(t *testing.T) {
	f := newFixture(t)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	clients := f.clients()
	for name, c := range clients { // warm up: pools, TLS, HTTP/2
		if resp, body := do(t, c.c, "GET", c.base+"/", "huge.test", nil); resp.StatusCode != 502 {
			t.Errorf("%s: a 1 MiB response header: %d %q, want 502", name, resp.StatusCode, body)
		}
	}
	before := heap()
	for range 10 {
		for name, c := range clients {
			if resp, _ := do(t, c.c, "GET", c.base+"/", "huge.test", nil); resp.StatusCode != 502 {
				t.Fatalf("%s: a 1 MiB response header: %d, want 502", name, resp.StatusCode)
			}
		}
	}
	if after := heap(); after > before+8<<20 {
		t.Errorf("the heap grew from %d to %d KiB over 40 answers with 1 MiB headers", before>>10, after>>10)
	}
}

// Upgraded connections are bounded per sandbox port and in time.
func TestProxyUpgradeBounds(t *testing.T) {
	f := newFixture(t)
	f.proxy.upgrades.perTarget, f.proxy.upgrades.idle = 1, 500*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dial := func() (*websocket.Conn, *http.Response, error) {
		return websocket.Dial(ctx, "ws://"+f.plain+"/ws", &websocket.DialOptions{Host: "app.test"})
	}
	first, _, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	defer first.CloseNow()
	if _, resp, err := dial(); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a second WebSocket to a port that holds one: %v %v, want 503", resp, err)
	}
	// One client address is bounded too, whichever port it dials.
	f.proxy.upgrades.perTarget, f.proxy.upgrades.perClient = 10, 1
	if _, resp, err := dial(); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a second WebSocket from a client that holds one: %v %v, want 503", resp, err)
	}
	// Talking keeps it open past the idle time; silence ends it.
	for range 4 {
		time.Sleep(200 * time.Millisecond)
		if err := first.Write(ctx, websocket.MessageText, []byte("still here")); err != nil {
			t.Fatalf("a WebSocket in use was cut: %v", err)
		}
		if _, _, err := first.Read(ctx); err != nil {
			t.Fatalf("a WebSocket in use was cut: %v", err)
		}
	}
	start := time.Now()
	if _, _, err := first.Read(ctx); err == nil {
		t.Error("a silent WebSocket got a message")
	} else if d := time.Since(start); d > 3*time.Second {
		t.Errorf("a silent WebSocket was cut after %s, want about 500ms", d)
	}
	// Its slot is free again.
	waitUntil := time.Now().Add(2 * time.Second)
	for {
		ws, _, err := dial()
		if err == nil {
			ws.Close(websocket.StatusNormalClosure, "")
			break
		}
		if time.Now().After(waitUntil) {
			t.Fatalf("after the first WebSocket ended, another: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A slot is given back once, however often its release is called (an
// upgrade whose hijack never came, released by its timer and again).
func TestUpgradeSlotsReleaseOnce(t *testing.T) {
	u := newUpgrades()
	u.perTarget = 2
	r1, no := u.acquire("10.244.1.2:80", "192.0.2.1")
	if no != nil {
		t.Fatal(no)
	}
	if _, no := u.acquire("10.244.1.2:80", "192.0.2.2"); no != nil {
		t.Fatal(no)
	}
	r1()
	r1()
	if u.n != 1 || u.byTarget["10.244.1.2:80"] != 1 || len(u.byClient) != 1 {
		t.Errorf("after one release called twice: %d open, %v by target, %v by client; want 1", u.n, u.byTarget, u.byClient)
	}
	if _, no := u.acquire("10.244.1.2:80", "192.0.2.3"); no != nil {
		t.Errorf("a port with one of its two slots free: %v", no)
	}
	if _, no := u.acquire("10.244.1.2:80", "192.0.2.4"); no == nil {
		t.Error("a third upgrade to a port that holds two was let through")
	}
}
