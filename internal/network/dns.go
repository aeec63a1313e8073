package network

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Zone is where sandboxes have names: NAME.NAMESPACE.hearth.
const Zone = "hearth."

// DNS answers the sandboxes' queries on their gateway: A records of
// sandboxes (Zone) from Lookup, everything else forwarded to the host's
// own resolvers.
type DNS struct {
	Addr      string // host:port to serve on (UDP and TCP)
	Lookup    func(name, namespace string) (netip.Addr, bool)
	Upstreams []string // host:port
	Log       *slog.Logger
}

// Serve serves until ctx ends.
func (d *DNS) Serve(ctx context.Context) error {
	mux := dns.NewServeMux()
	mux.HandleFunc(Zone, d.local)
	mux.HandleFunc(".", d.forward)
	pc, err := net.ListenPacket("udp", d.Addr)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", d.Addr)
	if err != nil {
		pc.Close()
		return err
	}
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

func (d *DNS) local(w dns.ResponseWriter, q *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	for _, question := range q.Question {
		addr, ok := d.lookupName(question.Name)
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

// lookupName resolves NAME.NAMESPACE.hearth.
func (d *DNS) lookupName(name string) (netip.Addr, bool) {
	labels := dns.SplitDomainName(strings.TrimSuffix(strings.ToLower(name), Zone))
	if len(labels) != 2 {
		return netip.Addr{}, false
	}
	return d.Lookup(labels[0], labels[1])
}

func (d *DNS) forward(w dns.ResponseWriter, q *dns.Msg) {
	network := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	c := &dns.Client{Net: network, Timeout: 2 * time.Second}
	var err error
	for _, up := range d.Upstreams {
		var r *dns.Msg
		if r, _, err = c.Exchange(q, up); err == nil {
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
