package network

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/time/rate"
)

// Zone is where sandboxes have names: NAME.NAMESPACE.hearth.
const Zone = "hearth."

// DNS answers the sandboxes' queries on their gateway: A records of the
// asking sandbox's own namespace's sandboxes (Zone) from Lookup, everything
// else forwarded to the host's own resolvers, at most Rate a second (burst
// Burst; DefaultRate and DefaultBurst if 0) for each sandbox and only for
// those that may reach
// the outside (DNS would otherwise be their way out). Queries from an
// address Client does not know are refused.
type DNS struct {
	Addr      string // host:port to serve on (UDP and TCP)
	Client    func(src netip.Addr) (Client, bool)
	Lookup    func(name, namespace string) (netip.Addr, bool)
	Upstreams []string // host:port
	Log       *slog.Logger
	Rate      rate.Limit
	Burst     int

	mu       sync.Mutex
	limiters map[netip.Addr]*rate.Limiter
}

// Client is what the DNS server knows of the sandbox that asks.
type Client struct {
	Namespace string
	// Forward: names outside Zone are resolved (the sandbox has NAT).
	Forward bool
}

// The forwarding rate of one sandbox: a package install looks up a few
// dozen names; a sandbox that tunnels data through queries gets this much.
const (
	DefaultRate  = 50
	DefaultBurst = 100
)

// Serve serves until ctx ends.
func (d *DNS) Serve(ctx context.Context) error {
	mux := dns.NewServeMux()
	mux.HandleFunc(Zone, d.known(d.local))
	mux.HandleFunc(".", d.known(d.forward))
	pc, err := net.ListenPacket("udp", d.Addr)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", d.Addr)
	if err != nil {
		pc.Close()
		return err
	}
	ln = &connLimit{Listener: ln, perSource: maxTCPPerSource, total: maxTCP, open: map[netip.Addr]int{}}
	servers := []*dns.Server{{PacketConn: pc, Handler: mux}, {Listener: ln, Handler: mux}}
	errc := make(chan error, len(servers))
	for _, s := range servers {
		go func() { errc <- s.ActivateAndServe() }()
	}
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	for _, s := range servers {
		_ = s.Shutdown()
	}
	return err
}

// known answers only the sandboxes Client knows: REFUSED for the rest.
func (d *DNS) known(h func(dns.ResponseWriter, *dns.Msg, netip.Addr, Client)) dns.HandlerFunc {
	return func(w dns.ResponseWriter, q *dns.Msg) {
		var src netip.Addr
		if ap, err := netip.ParseAddrPort(w.RemoteAddr().String()); err == nil {
			src = ap.Addr().Unmap()
		}
		c, ok := d.Client(src)
		if !ok {
			refuse(w, q)
			return
		}
		h(w, q, src, c)
	}
}

func refuse(w dns.ResponseWriter, q *dns.Msg) {
	m := new(dns.Msg)
	m.SetRcode(q, dns.RcodeRefused)
	_ = w.WriteMsg(m)
}

func (d *DNS) local(w dns.ResponseWriter, q *dns.Msg, _ netip.Addr, c Client) {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	for _, question := range q.Question {
		addr, ok := d.lookupName(question.Name, c.Namespace)
		if !ok {
			m.Rcode = dns.RcodeNameError
			continue
		}
		if question.Qtype == dns.TypeA || question.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
				A: net.IP(addr.AsSlice())})
		}
	}
	_ = w.WriteMsg(m)
}

// lookupName resolves NAME.NAMESPACE.hearth if NAMESPACE is ns: other
// namespaces' names do not exist for a sandbox.
func (d *DNS) lookupName(name, ns string) (netip.Addr, bool) {
	labels := dns.SplitDomainName(strings.TrimSuffix(strings.ToLower(name), Zone))
	if len(labels) != 2 || labels[1] != ns {
		return netip.Addr{}, false
	}
	return d.Lookup(labels[0], labels[1])
}

// allow takes one forward from src's budget.
func (d *DNS) allow(src netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.limiters == nil || len(d.limiters) > 4096 {
		d.limiters = map[netip.Addr]*rate.Limiter{} // sandboxes come and go
	}
	l, ok := d.limiters[src]
	if !ok {
		r, b := d.Rate, d.Burst
		if r == 0 {
			r, b = DefaultRate, DefaultBurst
		}
		l = rate.NewLimiter(r, b)
		d.limiters[src] = l
	}
	return l.Allow()
}

func (d *DNS) forward(w dns.ResponseWriter, q *dns.Msg, src netip.Addr, c Client) {
	if !c.Forward || !d.allow(src) {
		refuse(w, q)
		return
	}
	network := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	dc := &dns.Client{Net: network, Timeout: 2 * time.Second}
	var err error
	for _, up := range d.Upstreams {
		var r *dns.Msg
		if r, _, err = dc.Exchange(q, up); err == nil {
			_ = w.WriteMsg(r)
			return
		}
	}
	if err == nil {
		err = errors.New("no upstream resolvers")
	}
	if d.Log != nil {
		d.Log.Debug("dns forward", "name", q.Question, "err", err)
	}
	m := new(dns.Msg)
	m.SetRcode(q, dns.RcodeServerFailure)
	_ = w.WriteMsg(m)
}

// Upstreams are the nameservers of the host's resolv.conf that are not
// the gateway itself, as host:port.
func Upstreams(resolvConf string, gateway netip.Addr) []string {
	cfg, err := dns.ClientConfigFromFile(resolvConf)
	if err != nil {
		return nil
	}
	var out []string
	for _, s := range cfg.Servers {
		if a, err := netip.ParseAddr(s); err == nil && a != gateway {
			out = append(out, net.JoinHostPort(s, cfg.Port))
		}
	}
	return out
}

// DNS over TCP holds a goroutine and a descriptor a connection (each
// closed after 8 s idle by the server): a sandbox may hold this many at
// once, all sandboxes of the host maxTCP; others are closed as they come.
const (
	maxTCPPerSource = 16
	maxTCP          = 1024
)

// connLimit is a listener that closes connections past its bounds.
type connLimit struct {
	net.Listener
	perSource, total int

	mu   sync.Mutex
	open map[netip.Addr]int
	n    int
}

func (l *connLimit) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var src netip.Addr
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
			src = ap.Addr().Unmap()
		}
		l.mu.Lock()
		ok := l.open[src] < l.perSource && l.n < l.total
		if ok {
			l.open[src]++
			l.n++
		}
		l.mu.Unlock()
		if !ok {
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, release: func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.n--
			if l.open[src]--; l.open[src] <= 0 {
				delete(l.open, src)
			}
		}}, nil
	}
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
