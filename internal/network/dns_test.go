package network

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"

	"hearth.dev/hearth/api/v1alpha1"
)

// freeAddr is a loopback UDP and TCP address nobody listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestDNS(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The host's resolver: answers every name with 192.0.2.1.
	upstream := freeAddr(t)
	up := &dns.Server{Addr: upstream, Net: "udp", Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: net.IPv4(192, 0, 2, 1)})
		_ = w.WriteMsg(m)
	})}
	started := make(chan struct{})
	up.NotifyStartedFunc = func() { close(started) }
	go func() { _ = up.ListenAndServe() }()
	<-started
	defer func() { _ = up.Shutdown() }()

	clients := map[netip.Addr]Client{
		netip.MustParseAddr("127.0.0.1"): {Namespace: "team-a", Forward: true},
		netip.MustParseAddr("127.0.0.2"): {Namespace: "team-b"}, // no NAT
	}
	addr := freeAddr(t)
	d := &DNS{Addr: addr, Upstreams: []string{upstream}, Rate: 0.001, Burst: 5,
		Client: func(src netip.Addr) (Client, bool) { c, ok := clients[src]; return c, ok },
		Lookup: func(name, ns string) (netip.Addr, bool) {
			return netip.MustParseAddr("10.244.0.9"), name == "x" // x exists in every namespace
		}}
	go func() { _ = d.Serve(ctx) }()

	ask := func(from, name string) (int, []dns.RR) {
		t.Helper()
		c := &dns.Client{Timeout: time.Second, Dialer: &net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP(from)}}}
		q := new(dns.Msg)
		q.SetQuestion(name, dns.TypeA)
		for i := 0; ; i++ {
			r, _, err := c.Exchange(q, addr)
			if err == nil {
				return r.Rcode, r.Answer
			}
			if i == 20 {
				t.Fatalf("%s asks %s: %v", from, name, err)
			}
			time.Sleep(50 * time.Millisecond) // the server starting
		}
	}
	for _, tc := range []struct {
		from, name string
		rcode      int
		answers    int
	}{
		{"127.0.0.1", "x.team-a.hearth.", dns.RcodeSuccess, 1},
		{"127.0.0.1", "x.team-b.hearth.", dns.RcodeNameError, 0}, // another namespace's
		{"127.0.0.1", "example.com.", dns.RcodeSuccess, 1},
		{"127.0.0.2", "x.team-b.hearth.", dns.RcodeSuccess, 1},
		{"127.0.0.2", "example.com.", dns.RcodeRefused, 0},     // no NAT: no way out through DNS
		{"127.0.0.3", "x.team-a.hearth.", dns.RcodeRefused, 0}, // not a sandbox
	} {
		if rcode, ans := ask(tc.from, tc.name); rcode != tc.rcode || len(ans) != tc.answers {
			t.Errorf("%s asks %s: rcode %d with %d answers, want %d with %d", tc.from, tc.name, rcode, len(ans), tc.rcode, tc.answers)
		}
	}
	// Forwarding is rate limited per sandbox; its own names are not.
	// (one forward above: 4 of the burst of 5 left)
	refused := 0
	for i := 0; i < 10; i++ {
		if rcode, _ := ask("127.0.0.1", "example.com."); rcode == dns.RcodeRefused {
			refused++
		}
	}
	if refused != 6 {
		t.Errorf("%d of 10 forwards refused, want the 6 past the burst", refused)
	}
	if rcode, _ := ask("127.0.0.1", "x.team-a.hearth."); rcode != dns.RcodeSuccess {
		t.Errorf("a sandbox's own names after its forwarding budget: rcode %d", rcode)
	}
	// Over TCP, a sandbox holds at most maxTCPPerSource connections; the
	// next is closed, another sandbox's is served.
	tcp := func(from string) (*dns.Conn, error) {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: time.Second}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		return &dns.Conn{Conn: c}, nil
	}
	query := func(c *dns.Conn) error {
		q := new(dns.Msg)
		q.SetQuestion("x.team-a.hearth.", dns.TypeA)
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if err := c.WriteMsg(q); err != nil {
			return err
		}
		_, err := c.ReadMsg()
		return err
	}
	for i := range maxTCPPerSource {
		c, err := tcp("127.0.0.1")
		if err == nil {
			defer c.Close()
			err = query(c)
		}
		if err != nil {
			t.Fatalf("TCP connection %d of %d: %v", i+1, maxTCPPerSource, err)
		}
	}
	if c, err := tcp("127.0.0.1"); err == nil {
		defer c.Close()
		if err := query(c); err == nil {
			t.Errorf("a sandbox's TCP connection past %d was served", maxTCPPerSource)
		}
	}
	c, err := tcp("127.0.0.2")
	if err == nil {
		defer c.Close()
		err = query(c)
	}
	if err != nil {
		t.Errorf("another sandbox's TCP connection: %v", err)
	}
}

func TestUnreachable(t *testing.T) {
	var hosts []v1alpha1.Host
	for _, cidr := range []string{"10.244.0.0/24", "10.244.7.0/24", "bad"} {
		hosts = append(hosts, v1alpha1.Host{Spec: v1alpha1.HostSpec{SandboxCIDR: cidr}})
	}
	got := map[netip.Prefix]bool{}
	for _, p := range Unreachable(netip.MustParsePrefix("10.244.0.0/16"), hosts) {
		got[p] = true
	}
	for _, want := range []string{"0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3",
		"10.244.0.0/32", "10.244.255.255/32", "10.244.0.1/32", "10.244.0.255/32", "10.244.7.0/32", "10.244.7.1/32", "10.244.7.255/32"} {
		if !got[netip.MustParsePrefix(want)] {
			t.Errorf("%s is not unreachable", want)
		}
	}
	if len(got) != 11 {
		t.Errorf("%d unreachable prefixes, want 11: %v", len(got), got)
	}
}
