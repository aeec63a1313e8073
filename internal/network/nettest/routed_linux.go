package nettest

import (
	"net/netip"

	"github.com/vishvananda/netlink"

	"hearth.dev/hearth/internal/network"
)

// Routed is a host namespace set up as a node agent sets a host up
// (network.Host: forwarding, the gateway, NAT), routing between sandbox
// namespaces joined to it by veths that stand for taps: the policy
// programs go on the host ends.
type Routed struct {
	Host      string
	Net       *network.Host
	Sandboxes []RoutedSandbox
}

// RoutedSandbox is one sandbox namespace: its address (a /32 with a
// default route through the gateway, as a guest has) and the index of its
// "tap" in the host namespace.
type RoutedSandbox struct {
	NS      string
	Addr    netip.Addr
	Ifindex int
}

// NewRouted makes a host namespace and n sandbox namespaces with the
// addresses cidr's .2, .3, ... (cidr's .1 is the gateway).
func NewRouted(t TB, n int, cidr netip.Prefix, cluster netip.Prefix) *Routed {
	t.Helper()
	s := Suffix()
	r := &Routed{Host: NS(t, "hnH"+s), Net: &network.Host{CIDR: cidr, Cluster: cluster}}
	if err := Do(r.Host, r.Net.Setup); err != nil {
		t.Fatalf("set up the host namespace: %v", err)
	}
	addr := r.Net.Gateway()
	for i := 0; i < n; i++ {
		addr = addr.Next()
		sb := RoutedSandbox{NS: NS(t, "hn"+string(rune('A'+i))+s), Addr: addr}
		dev := "t" + sb.NS
		Sh(t, "ip", "-n", r.Host, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", sb.NS)
		Sh(t, "ip", "-n", sb.NS, "addr", "add", addr.String()+"/32", "dev", "eth0")
		Sh(t, "ip", "-n", sb.NS, "link", "set", "eth0", "up")
		Sh(t, "ip", "-n", sb.NS, "route", "add", r.Net.Gateway().String(), "dev", "eth0", "scope", "link")
		Sh(t, "ip", "-n", sb.NS, "route", "add", "default", "via", r.Net.Gateway().String(), "dev", "eth0")
		err := Do(r.Host, func() error {
			link, err := netlink.LinkByName(dev)
			if err != nil {
				return err
			}
			sb.Ifindex, err = r.Net.Plug(link, addr)
			return err
		})
		if err != nil {
			t.Fatalf("plug %s: %v", sb.NS, err)
		}
		r.Sandboxes = append(r.Sandboxes, sb)
	}
	return r
}
