package policy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network"
	"hearth.dev/hearth/internal/network/nettest"
	"hearth.dev/hearth/internal/network/policy"
	"hearth.dev/hearth/internal/testenv"
)

// lab is a host namespace that routes between two sandbox namespaces, A
// and B, through veths that stand for taps, with the policy programs on
// them, as the node agent sets a host up.
type lab struct {
	t          *testing.T
	host, a, b string
	dp         *policy.Datapath
	ifA, ifB   int
	net        *network.Host
}

var (
	addrA = netip.MustParseAddr("10.99.1.2")
	addrB = netip.MustParseAddr("10.99.1.3")
	mgmt  = netip.MustParseAddr("10.98.0.1")
)

func newLab(t *testing.T) *lab {
	if os.Geteuid() != 0 {
		testenv.Need(t, false, "network namespaces and eBPF need root")
	}
	r := nettest.NewRouted(t, 2, netip.MustParsePrefix("10.99.1.0/24"), netip.MustParsePrefix("10.99.0.0/16"))
	l := &lab{t: t, host: r.Host, a: r.Sandboxes[0].NS, b: r.Sandboxes[1].NS, ifA: r.Sandboxes[0].Ifindex, ifB: r.Sandboxes[1].Ifindex, net: r.Net}
	// The host's management network: an address the sandboxes must not reach.
	nettest.Sh(t, "ip", "-n", l.host, "link", "add", "mg0", "type", "veth", "peer", "name", "mg1")
	nettest.Sh(t, "ip", "-n", l.host, "addr", "add", mgmt.String()+"/24", "dev", "mg0")
	nettest.Sh(t, "ip", "-n", l.host, "link", "set", "mg0", "up")
	l.do(func() error {
		var err error
		if l.dp, err = policy.Load(""); err != nil {
			return err
		}
		if err := l.dp.SetNetwork(l.net.Gateway(), l.net.Cluster); err != nil {
			return err
		}
		if err := l.dp.SetSpecial(map[netip.Prefix]uint32{
			netip.MustParsePrefix("10.98.0.0/24"):   policy.Forbidden | policy.Trusted,
			netip.MustParsePrefix("169.254.0.0/16"): policy.Forbidden,
		}); err != nil {
			return err
		}
		if err := l.dp.Attach(l.ifA, addrA, true); err != nil {
			return err
		}
		return l.dp.Attach(l.ifB, addrB, true)
	})
	t.Cleanup(func() { _ = l.dp.Close() })
	return l
}

func (l *lab) do(f func() error) {
	l.t.Helper()
	if err := nettest.Do(l.host, f); err != nil {
		l.t.Fatal(err)
	}
}

// serve answers TCP connections on addr in ns with "hello".
func (l *lab) serve(ns, addr string) {
	l.t.Helper()
	ln, err := nettest.Listen(ns, "tcp", addr)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
}

// reach reports whether a TCP echo round trip from ns to addr works.
func (l *lab) reach(ns, addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	c, err := nettest.Dial(ctx, ns, "tcp", addr)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

func echo(c net.Conn) bool {
	_ = c.SetDeadline(time.Now().Add(700 * time.Millisecond))
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	b := make([]byte, 4)
	_, err := io.ReadFull(c, b)
	return err == nil && string(b) == "ping"
}

func (l *lab) ping(ns, addr string) bool {
	return exec.Command("ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", addr).Run() == nil
}

// udp reports whether a datagram from ns reaches addr and its echo comes back.
func (l *lab) udp(ns, addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	c, err := nettest.Dial(ctx, ns, "udp", addr)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

func (l *lab) serveUDP(ns, addr string) {
	l.t.Helper()
	pc, err := nettest.ListenPacket(ns, "udp", addr)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(b[:n], from)
		}
	}()
}

func (l *lab) apply(policies ...v1alpha1.NetworkPolicy) {
	l.t.Helper()
	c := &policy.Cluster{Policies: policies, Sandboxes: []policy.Sandbox{
		{Namespace: "default", Name: "a", Labels: map[string]string{"app": "a"}, IP: addrA},
		{Namespace: "default", Name: "b", Labels: map[string]string{"app": "b"}, IP: addrB,
			Ports: []v1alpha1.SandboxPort{{Name: "http", Port: 8080, Protocol: v1alpha1.ProtocolTCP}}},
	}}
	l.do(func() error {
		return errors.Join(l.dp.SetPolicy(l.ifA, policy.Compile(c, c.Sandboxes[0])),
			l.dp.SetPolicy(l.ifB, policy.Compile(c, c.Sandboxes[1])))
	})
}

func np(name string, spec v1alpha1.NetworkPolicySpec) v1alpha1.NetworkPolicy {
	return v1alpha1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}, Spec: spec}
}

func sel(app string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: map[string]string{"app": app}}
}

func TestDatapath(t *testing.T) {
	l := newLab(t)
	b := func(port int) string { return fmt.Sprintf("%s:%d", addrB, port) }
	l.serve(l.b, b(8080))
	l.serve(l.b, b(9090))
	l.serveUDP(l.b, b(5353))
	// What a sandbox may reach of the host: DNS on the gateway, nothing else.
	gw := l.net.Gateway().String()
	l.serveUDP(l.host, gw+":53")
	l.serve(l.host, gw+":22")
	l.serve(l.host, mgmt.String()+":22")
	l.serve(l.host, "0.0.0.0:6443")

	expect := func(what string, got, want bool) {
		t.Helper()
		if got != want {
			t.Errorf("%s: got %v, want %v", what, got, want)
		}
	}
	expect("A→B:8080 without policies", l.reach(l.a, b(8080)), true)
	expect("A→B:9090 without policies", l.reach(l.a, b(9090)), true)
	expect("A→B udp", l.udp(l.a, b(5353)), true)
	expect("A→B icmp", l.ping(l.a, addrB.String()), true)
	expect("A→gateway dns", l.udp(l.a, gw+":53"), true)
	expect("A→gateway icmp", l.ping(l.a, gw), true)
	expect("A→gateway:22", l.reach(l.a, gw+":22"), false)
	expect("A→management address", l.reach(l.a, mgmt.String()+":22"), false)
	expect("A→169.254.169.254", l.reach(l.a, "169.254.169.254:80"), false)
	expect("host→B (the ingress's path)", l.reach(l.host, b(8080)), true)

	// An established connection to 8080, kept across the policy changes.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	kept, err := nettest.Dial(ctx, l.a, "tcp", b(8080))
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()

	// B accepts only A, on its named port http (8080).
	httpPort := intstr.FromString("http")
	l.apply(np("b-in", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("b"),
		Ingress: []v1alpha1.NetworkPolicyIngressRule{{From: []v1alpha1.NetworkPolicyPeer{{SandboxSelector: sel("a")}},
			Ports: []v1alpha1.NetworkPolicyPort{{Port: &httpPort}}}}}))
	expect("A→B:8080 allowed", l.reach(l.a, b(8080)), true)
	expect("A→B:9090 not allowed", l.reach(l.a, b(9090)), false)
	expect("A→B udp not allowed", l.udp(l.a, b(5353)), false)
	expect("A→B icmp not allowed", l.ping(l.a, addrB.String()), false)
	expect("the established connection", echo(kept), true)
	expect("host→B under an ingress policy", l.reach(l.host, b(9090)), true)

	// A range and ICMP added: a policy update on the established flow.
	lo := intstr.FromInt32(9000)
	icmp := v1alpha1.ProtocolICMP
	udp := v1alpha1.ProtocolUDP
	l.apply(np("b-in", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("b"),
		Ingress: []v1alpha1.NetworkPolicyIngressRule{{From: []v1alpha1.NetworkPolicyPeer{{SandboxSelector: sel("a")}},
			Ports: []v1alpha1.NetworkPolicyPort{{Port: &httpPort}, {Port: &lo, EndPort: ptr(int32(9100))}, {Protocol: &icmp}, {Protocol: &udp}}}}}))
	expect("A→B:9090 in the range", l.reach(l.a, b(9090)), true)
	expect("A→B icmp allowed", l.ping(l.a, addrB.String()), true)
	expect("A→B udp allowed", l.udp(l.a, b(5353)), true)
	expect("the established connection after an update", echo(kept), true)

	// A may send only to 10.99.0.0/16 except B's /32: B is blocked, even
	// though B's ingress allows A; replies to B's connections still pass.
	l.apply(np("a-out", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("a"), PolicyTypes: []v1alpha1.PolicyType{v1alpha1.PolicyEgress},
		Egress: []v1alpha1.NetworkPolicyEgressRule{{To: []v1alpha1.NetworkPolicyPeer{{IPBlock: &v1alpha1.IPBlock{CIDR: "10.99.0.0/16", Except: []string{addrB.String() + "/32"}}}}}}}))
	expect("A→B:8080 to an excepted block", l.reach(l.a, b(8080)), false)
	expect("A→gateway dns under an egress policy", l.udp(l.a, gw+":53"), true)
	l.serve(l.a, addrA.String()+":7070")
	expect("B→A (replies to A pass its egress policy)", l.reach(l.b, addrA.String()+":7070"), true)

	// No policies: everything as before.
	l.apply()
	expect("A→B:9090 after the policies are removed", l.reach(l.a, b(9090)), true)
	expect("A→management address after", l.reach(l.a, mgmt.String()+":22"), false)
}

// A sandbox that sends from another address is dropped at its tap.
func TestDatapathAntiSpoofing(t *testing.T) {
	l := newLab(t)
	l.serve(l.b, addrB.String()+":8080")
	nettest.Sh(t, "ip", "-n", l.a, "addr", "add", "10.99.1.77/32", "dev", "eth0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := nettest.Do(l.a, func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("10.99.1.77")}}
		c, err := d.DialContext(ctx, "tcp", addrB.String()+":8080")
		if err == nil {
			c.Close()
		}
		return err
	})
	if err == nil {
		t.Fatal("a connection from a spoofed source address went through")
	}
	if !l.reach(l.a, addrB.String()+":8080") {
		t.Fatal("the sandbox's own address does not get through")
	}
}

func ptr[T any](v T) *T { return &v }

// Pinned programs keep enforcing after the process lets go of them, and
// the next Load takes over their state.
func TestDatapathPinned(t *testing.T) {
	l := newLab(t)
	pins := filepath.Join(t.TempDir(), "bpf")
	if err := network.EnsureBPFFS(pins); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(pins, unix.MNT_DETACH) })
	_ = l.dp.Close() // the lab's unpinned programs
	l.serve(l.b, addrB.String()+":8080")
	l.serve(l.b, addrB.String()+":9090")
	open := func() *policy.Datapath {
		var dp *policy.Datapath
		l.do(func() error {
			var err error
			dp, err = policy.Load(filepath.Join(pins, "host"))
			return err
		})
		return dp
	}
	l.dp = open()
	l.do(func() error {
		return errors.Join(l.dp.SetNetwork(l.net.Gateway(), l.net.Cluster), l.dp.Attach(l.ifA, addrA, true), l.dp.Attach(l.ifB, addrB, true))
	})
	port := intstr.FromInt32(8080)
	l.apply(np("b-in", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("b"),
		Ingress: []v1alpha1.NetworkPolicyIngressRule{{Ports: []v1alpha1.NetworkPolicyPort{{Port: &port}}}}}))
	if !l.reach(l.a, addrB.String()+":8080") || l.reach(l.a, addrB.String()+":9090") {
		t.Fatal("the policy does not hold before the restart")
	}
	_ = l.dp.Close() // the node agent stops
	if l.reach(l.a, addrB.String()+":9090") {
		t.Error("with the agent gone, the policy no longer holds")
	}
	l.dp = open() // and starts again
	if l.reach(l.a, addrB.String()+":9090") || !l.reach(l.a, addrB.String()+":8080") {
		t.Error("after a restart the policy changed")
	}
	l.apply() // the policy is removed: the recovered state is updated
	if !l.reach(l.a, addrB.String()+":9090") {
		t.Error("removing the policy after a restart did not open 9090")
	}
	l.do(func() error { return errors.Join(l.dp.Detach(l.ifA), l.dp.Detach(l.ifB)) })
	if entries, _ := os.ReadDir(filepath.Join(pins, "host")); len(entries) != 6 { // the maps alone
		t.Errorf("pins after detaching both taps: %d entries, want the 6 maps", len(entries))
	}
}

// udpFlow is a UDP flow that B opens to A (B: a connected socket; A: a
// bound one that can answer unprompted).
func (l *lab) udpFlow(port int) (b net.Conn, a net.PacketConn) {
	l.t.Helper()
	dst := fmt.Sprintf("%s:%d", addrA, port)
	a, err := nettest.ListenPacket(l.a, "udp", dst)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { a.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	b, err = nettest.Dial(ctx, l.b, "udp", dst)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { b.Close() })
	if _, err := b.Write([]byte("open")); err != nil {
		l.t.Fatal(err)
	}
	buf := make([]byte, 16)
	_ = a.SetReadDeadline(time.Now().Add(time.Second))
	if _, _, err := a.ReadFrom(buf); err != nil {
		l.t.Fatalf("B's datagram to A: %v", err)
	}
	return b, a
}

// answered reports whether a datagram A sends on the flow reaches B.
func answered(b net.Conn, a net.PacketConn) bool {
	if _, err := a.WriteTo([]byte("answer"), b.LocalAddr()); err != nil {
		return false
	}
	buf := make([]byte, 16)
	_ = b.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	n, err := b.Read(buf)
	return err == nil && string(buf[:n]) == "answer"
}

// A sandbox that gets a deleted sandbox's address does not get its flows:
// B, which accepts nothing, had a flow with A; once A's tap is detached,
// whoever has A's address next cannot send on it.
func TestDatapathForgetsFlows(t *testing.T) {
	l := newLab(t)
	l.apply(np("b-in", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("b")}))
	b, a := l.udpFlow(6000)
	if !answered(b, a) {
		t.Fatal("A's answer on B's flow was dropped")
	}
	l.do(func() error { return errors.Join(l.dp.Detach(l.ifA), l.dp.Attach(l.ifA, addrA, true)) })
	if answered(b, a) {
		t.Error("the next sandbox at A's address sent on A's flow with B")
	}

	// A flow with a peer elsewhere in the cluster: Forget.
	b2, a2 := l.udpFlow(6001)
	if !answered(b2, a2) {
		t.Fatal("A's answer on B's second flow was dropped")
	}
	l.do(func() error { return l.dp.Forget(func(x netip.Addr) bool { return x == addrA }) })
	if answered(b2, a2) {
		t.Error("a flow with a peer forgotten still passes")
	}
}

// One sandbox's flows fill its own connection table, not another's.
func TestDatapathTablePerSandbox(t *testing.T) {
	l := newLab(t)
	l.apply(np("b-in", v1alpha1.NetworkPolicySpec{SandboxSelector: *sel("b")}))
	b, a := l.udpFlow(6000)
	// A opens 20,000 flows (to nowhere: the host drops them).
	err := nettest.Do(l.a, func() error {
		c, err := net.ListenPacket("udp", addrA.String()+":0")
		if err != nil {
			return err
		}
		defer c.Close()
		for i := 0; i < 20000; i++ {
			dst := &net.UDPAddr{IP: net.IPv4(10, 99, 200, byte(i%250+1)), Port: 1024 + i/250}
			if _, err := c.WriteTo([]byte("x"), dst); err != nil && !errors.Is(err, unix.ECONNREFUSED) && !errors.Is(err, unix.EHOSTUNREACH) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var nA, nB int
	l.do(func() error {
		var err error
		if nA, err = l.dp.Flows(l.ifA); err != nil {
			return err
		}
		nB, err = l.dp.Flows(l.ifB)
		return err
	})
	if nA > policy.TableEntries || nA < policy.TableEntries/2 {
		t.Errorf("A's table holds %d entries after 20,000 flows, want at most %d and not far below", nA, policy.TableEntries)
	}
	if nB != 2 {
		t.Errorf("B's table holds %d entries, want its one flow's 2", nB)
	}
	if !answered(b, a) {
		t.Error("A's flood cost B its flow")
	}
}

// The special addresses of a large cluster (five per host, 10,000 hosts)
// fit, replace one another whole, and a set past the map is refused.
func TestDatapathSpecialAtScale(t *testing.T) {
	l := newLab(t)
	l.serve(l.host, mgmt.String()+":22")
	large := map[netip.Prefix]uint32{netip.MustParsePrefix("10.98.0.0/24"): policy.Forbidden | policy.Trusted}
	for i := range 50_000 {
		a := netip.AddrFrom4([4]byte{172, byte(16 + i>>16), byte(i >> 8), byte(i)})
		large[netip.PrefixFrom(a, 32)] = policy.Forbidden
	}
	l.do(func() error { return l.dp.SetSpecial(large) })
	if l.reach(l.a, mgmt.String()+":22") {
		t.Error("the management network was reached with 50,000 special addresses set")
	}
	// The next set drops what it does not name: the management network too.
	l.do(func() error {
		return l.dp.SetSpecial(map[netip.Prefix]uint32{netip.MustParsePrefix("169.254.0.0/16"): policy.Forbidden})
	})
	if !l.reach(l.a, mgmt.String()+":22") {
		t.Error("the management network, no longer special, was not reached")
	}
	for i := range policy.SpecialEntries + 1 - len(large) {
		large[netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}), 32)] = policy.Forbidden
	}
	if err := l.dp.SetSpecial(large); err == nil {
		t.Errorf("%d special addresses were taken, more than the map holds", len(large))
	}
}
