package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"hearth.dev/hearth/internal/ingress"
	"hearth.dev/hearth/internal/network/nettest"
)

// IngressOptions configure `hearth bench ingress`.
type IngressOptions struct {
	Duration time.Duration // per target and round, at each load
	Conc     int           // connections of the throughput runs
	Rounds   int
	Out      io.Writer
	Log      *slog.Logger
}

// LoadFigures are one target's figures.
type LoadFigures struct {
	// At one connection, one request at a time: the latency a request
	// sees when nothing queues.
	P50ms float64 `json:"p50_ms"`
	P99ms float64 `json:"p99_ms"`
	// At Conc connections.
	RPS     float64 `json:"rps"`
	LoadP50 float64 `json:"load_p50_ms"`
	LoadP99 float64 `json:"load_p99_ms"`
	// The proxy's CPU time (all its processes, user and system) per
	// request under that load: what it costs, whatever share of this
	// shared machine it got (0 for the direct connection).
	CPUusPerReq float64 `json:"cpu_us_per_req"`
}

// IngressResult is the benchmark's outcome.
type IngressResult struct {
	Rounds int `json:"rounds"`
	Conc   int `json:"conc"`
	// Loader is what made the load at Conc connections: wrk, or Go's
	// HTTP client where wrk is not installed.
	Loader string      `json:"loader"`
	Direct LoadFigures `json:"direct"`
	Hearth LoadFigures `json:"hearth"`
	Nginx  LoadFigures `json:"nginx"`
	// Added latency at one connection (p50 and p99 over direct).
	AddedP50ms      float64 `json:"added_p50_ms"`
	AddedP99ms      float64 `json:"added_p99_ms"`
	NginxAddedP50ms float64 `json:"nginx_added_p50_ms"`
	// Throughput against nginx's (≥ 1: at least as fast).
	RPSvsNginx float64 `json:"rps_vs_nginx"`
}

// Summary is the result in the benchmarks' common shape: requests/s
// against nginx's (target ≥ 1), and the one-connection p50 against a
// direct connection's and nginx's.
func (r *IngressResult) Summary() *Result {
	return &Result{Bench: "ingress", N: r.Rounds, Details: r,
		Figure: NewFigure("rps", r.Hearth.RPS, "nginx_rps", r.Nginx.RPS, Higher, 1),
		More: []Figure{NewFigure("p50_ms", r.Hearth.P50ms, "direct_p50_ms", r.Direct.P50ms, Lower, 0),
			NewFigure("p50_ms", r.Hearth.P50ms, "nginx_p50_ms", r.Nginx.P50ms, Lower, 0),
			NewFigure("cpu_us_per_req", r.Hearth.CPUusPerReq, "nginx_cpu_us_per_req", r.Nginx.CPUusPerReq, Lower, 0)}}
}

// Ingress measures hearth's ingress data path (ingress.Proxy, as
// hearthd --roles=ingress serves it) against a direct connection and
// against nginx as a reverse proxy, with the same load generator in the
// same run. The backend is an HTTP server in a network namespace of its
// own behind a veth; the proxies and the load generator share a second
// namespace, so that nothing touches this machine's own network.
func Ingress(ctx context.Context, o IngressOptions) (*IngressResult, error) {
	if _, err := exec.LookPath("nginx"); err != nil {
		return nil, fmt.Errorf("nginx is the baseline: install it (apt-get install nginx-light)")
	}
	var res *IngressResult
	err := nettest.Run(func(s *nettest.Scope) error {
		front, back := nettest.NS(s, "hbf"+nettest.Suffix()), nettest.NS(s, "hbb"+nettest.Suffix())
		nettest.Sh(s, "ip", "-n", front, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", back)
		nettest.Sh(s, "ip", "-n", front, "addr", "add", "10.250.0.1/30", "dev", "v0")
		nettest.Sh(s, "ip", "-n", back, "addr", "add", "10.250.0.2/30", "dev", "v1")
		nettest.Sh(s, "ip", "-n", front, "link", "set", "v0", "up")
		nettest.Sh(s, "ip", "-n", back, "link", "set", "v1", "up")
		const backend = "10.250.0.2:8080"
		body := []byte(strings.Repeat("hello from the backend\n", 20))
		bl, err := nettest.Listen(back, "tcp", backend)
		if err != nil {
			return err
		}
		go func() {
			_ = http.Serve(bl, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "text/plain")
				_, _ = w.Write(body)
			}))
		}()
		s.Cleanup(func() { bl.Close() })

		// The ingress in a process of its own, as nginx is: the load
		// generator and the backend share this one.
		proxyGroup, err := startProxy(s, front, "127.0.0.1:8481", backend)
		if err != nil {
			return err
		}
		dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nettest.Dial(ctx, front, network, addr)
		}
		nginxGroup, err := startNginx(s, front, "127.0.0.1:8482", backend)
		if err != nil {
			return err
		}
		client := &http.Client{Transport: &http.Transport{
			DialContext: dial, MaxIdleConnsPerHost: o.Conc * 2, DisableCompression: true,
		}}
		targets := []struct {
			name string
			url  string
			lat1 []time.Duration
			latN []time.Duration
			n    int
			dur  time.Duration
			// wrk's percentiles, per round
			wrkP50, wrkP99 []float64
			group          int           // the proxy's process group (0: none)
			cpu            time.Duration // its CPU time under load
		}{{name: "direct", url: "http://" + backend + "/"}, {name: "hearth", url: "http://127.0.0.1:8481/", group: proxyGroup},
			{name: "nginx", url: "http://127.0.0.1:8482/", group: nginxGroup}}
		for i := range targets {
			if _, err := get(ctx, client, targets[i].url); err != nil {
				return fmt.Errorf("%s: %w", targets[i].name, err)
			}
		}
		// Load with wrk where it is installed: a load generator in C leaves
		// more of this 2-core machine to the proxies than Go's client does.
		_, werr := exec.LookPath("wrk")
		wrk := werr == nil
		// Rounds interleave the targets, so that drift in this shared
		// machine's speed spreads over all of them.
		for r := 0; r < o.Rounds; r++ {
			for i := range targets {
				t := &targets[i]
				l1, _ := load(ctx, client, t.url, 1, o.Duration/2)
				t.lat1 = append(t.lat1, l1...)
				var n int
				cpu0 := groupCPU(t.group)
				if wrk {
					w, err := loadWrk(front, t.url, o.Conc, o.Duration)
					if err != nil {
						return err
					}
					n = w.requests
					t.wrkP50, t.wrkP99 = append(t.wrkP50, w.p50), append(t.wrkP99, w.p99)
				} else {
					var lN []time.Duration
					lN, n = load(ctx, client, t.url, o.Conc, o.Duration)
					t.latN = append(t.latN, lN...)
				}
				cpu := groupCPU(t.group) - cpu0
				t.n, t.dur, t.cpu = t.n+n, t.dur+o.Duration, t.cpu+cpu
				fmt.Fprintf(o.Out, "round %d %-6s p50 %.3f ms (1 conn)  %.0f req/s (%d conns)  %.1f µs CPU/req\n", r+1, t.name, pctMs(l1, 50),
					float64(n)/o.Duration.Seconds(), o.Conc, float64(cpu.Microseconds())/float64(max(n, 1)))
			}
		}
		fig := func(i int) LoadFigures {
			t := targets[i]
			f := LoadFigures{P50ms: pctMs(t.lat1, 50), P99ms: pctMs(t.lat1, 99), RPS: round(float64(t.n)/t.dur.Seconds(), 0),
				LoadP50: pctMs(t.latN, 50), LoadP99: pctMs(t.latN, 99)}
			if wrk {
				f.LoadP50, f.LoadP99 = round(median(t.wrkP50), 3), round(median(t.wrkP99), 3)
			}
			if t.group != 0 && t.n > 0 {
				f.CPUusPerReq = round(float64(t.cpu.Microseconds())/float64(t.n), 2)
			}
			return f
		}
		res = &IngressResult{Rounds: o.Rounds, Conc: o.Conc, Loader: "go", Direct: fig(0), Hearth: fig(1), Nginx: fig(2)}
		if wrk {
			res.Loader = "wrk"
		}
		res.AddedP50ms = round(res.Hearth.P50ms-res.Direct.P50ms, 3)
		res.AddedP99ms = round(res.Hearth.P99ms-res.Direct.P99ms, 3)
		res.NginxAddedP50ms = round(res.Nginx.P50ms-res.Direct.P50ms, 3)
		res.RPSvsNginx = round(res.Hearth.RPS/res.Nginx.RPS, 2)
		return nil
	})
	return res, err
}

type fixedTarget struct{ t ingress.Target }

func (f fixedTarget) Resolve(context.Context, ingress.Request) (ingress.Target, *ingress.Refusal) {
	return f.t, nil
}

// ServeProxy serves hearth's ingress data path on listen, sending every
// request to backend (`hearth-bench ingress-proxy`, which Ingress runs in
// its namespace).
func ServeProxy(ctx context.Context, listen, backend string) error {
	ingress.TuneGC()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	p := ingress.NewProxy(fixedTarget{ingress.Target{Addr: backend, Timeout: 30 * time.Second}}, nil, slog.Default())
	return ingress.Serve(ctx, ln, nil, p, slog.Default())
}

// startProxy runs `hearth-bench ingress-proxy` in ns, in a process group
// of its own (ip netns exec execs it: the group's one process); it
// returns the group.
func startProxy(s *nettest.Scope, ns, listen, backend string) (int, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, self, "ingress-proxy", listen, backend)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("the ingress proxy: %w", err)
	}
	s.Cleanup(func() {
		// SIGTERM, so that it stops as it would in use; SIGKILL if not
		// within a few seconds.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		t := time.AfterFunc(5*time.Second, func() { _ = cmd.Process.Kill() })
		_ = cmd.Wait()
		t.Stop()
	})
	return cmd.Process.Pid, waitListening(ns, listen, func() string { return "" })
}

// groupCPU is the CPU time, user and system, of the live processes in
// process group pgid (0: none), from /proc.
func groupCPU(pgid int) time.Duration {
	if pgid == 0 {
		return 0
	}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var ticks int64
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ... utime stime: fields 14 and 15;
		// comm may hold spaces, so count from its closing parenthesis.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 || f[2] != strconv.Itoa(pgid) {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + st
	}
	return time.Duration(ticks) * time.Second / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc's times: 100 on Linux.
const clockTicks = 100

func waitListening(ns, addr string, why func() string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := nettest.Dial(context.Background(), ns, "tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s: %v %s", addr, err, why())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startNginx runs nginx in ns as a reverse proxy from listen to backend,
// tuned as one would for this: keep-alive to the backend, no logs.
func startNginx(s *nettest.Scope, ns, listen, backend string) (int, error) {
	dir, err := os.MkdirTemp("", "hbn")
	if err != nil {
		return 0, err
	}
	s.Cleanup(func() { os.RemoveAll(dir) })
	conf := fmt.Sprintf(`worker_processes auto;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body; proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fcgi; uwsgi_temp_path %[1]s/uwsgi; scgi_temp_path %[1]s/scgi;
  upstream backend { server %[3]s; keepalive 256; }
  server {
    listen %[2]s;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }
  }
}
`, dir, listen, backend)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return 0, err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "nginx", "-c", path, "-p", dir, "-g", "daemon off;")
	cmd.Stderr = os.Stderr
	// A group of its own, killed whole: nginx's workers outlive a master
	// that is SIGKILLed. (No Pdeathsig: this runs on a thread locked into
	// a namespace, whose end would kill nginx at once.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("nginx: %w", err)
	}
	s.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
	return cmd.Process.Pid, waitListening(ns, listen, func() string {
		b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		return string(b)
	})
}

func get(ctx context.Context, c *http.Client, url string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return 0, fmt.Errorf("status %s: %s", resp.Status, b)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return int(n), err
}

// load runs conc clients, each one request after another, for d; it
// returns each request's latency and how many succeeded.
func load(ctx context.Context, c *http.Client, url string, conc int, d time.Duration) ([]time.Duration, int) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var mu sync.Mutex
	var all []time.Duration
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, 4096)
			for ctx.Err() == nil {
				t0 := time.Now()
				if _, err := get(ctx, c, url); err != nil {
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			all = append(all, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return all, len(all)
}

// pctMs is the p-th percentile in milliseconds, to the microsecond.
func pctMs(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return round(float64(s[i])/float64(time.Millisecond), 3)
}

type wrkResult struct {
	requests int
	p50, p99 float64 // ms
}

// loadWrk runs wrk in ns against url.
func loadWrk(ns, url string, conc int, d time.Duration) (wrkResult, error) {
	out, err := exec.Command("ip", "netns", "exec", ns, "wrk", "-t", "2", "-c", fmt.Sprint(conc),
		"-d", fmt.Sprintf("%ds", max(1, int(d.Seconds()))), "--latency", url).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %w: %s", err, out)
	}
	var r wrkResult
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 4 && f[1] == "requests" && f[2] == "in":
			_, _ = fmt.Sscan(f[0], &r.requests)
		case len(f) == 2 && f[0] == "50%":
			r.p50 = wrkMs(f[1])
		case len(f) == 2 && f[0] == "99%":
			r.p99 = wrkMs(f[1])
		}
	}
	if r.requests == 0 {
		return r, fmt.Errorf("wrk made no requests: %s", out)
	}
	return r, nil
}

// wrkMs parses wrk's durations: 512.00us, 1.20ms, 2.00s.
func wrkMs(s string) float64 {
	var v float64
	for _, u := range []struct {
		suffix string
		ms     float64
	}{{"us", 0.001}, {"ms", 1}, {"s", 1000}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			if _, err := fmt.Sscan(n, &v); err == nil {
				return v * u.ms
			}
		}
	}
	return 0
}
