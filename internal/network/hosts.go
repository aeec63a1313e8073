package network

import (
	"net"
	"net/netip"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network/ipam"
)

// HostAddr is a Host's address: the IP of its status.address, if it is a
// routable IPv4 address.
func HostAddr(h *v1alpha1.Host) (netip.Addr, bool) {
	host, _, err := net.SplitHostPort(h.Status.Address)
	if err != nil {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(host)
	return a, err == nil && a.Is4() && !a.IsLoopback()
}

// HostRoutes are the routes to the hosts' sandbox ranges, each through
// its host's address, leaving out the host named self (whose range is
// local): what SyncPeers installs on a node or an ingress.
func HostRoutes(hosts []v1alpha1.Host, self string) map[netip.Prefix]netip.Addr {
	routes := map[netip.Prefix]netip.Addr{}
	for i := range hosts {
		h := &hosts[i]
		via, ok := HostAddr(h)
		p, err := netip.ParsePrefix(h.Spec.SandboxCIDR)
		if !ok || err != nil || h.Name == self {
			continue
		}
		routes[p.Masked()] = via
	}
	return routes
}

// Unreachable are the addresses no sandbox sends to, besides the hosts'
// own: "this network", loopback, link-local (cloud metadata), multicast,
// the reserved range and the limited broadcast (224.0.0.0/3), the
// cluster range's first and last addresses, and in every host's range its
// network, gateway and broadcast addresses (a sandbox's own gateway
// answers it ICMP and DNS: the programs check it first).
func Unreachable(cluster netip.Prefix, hosts []v1alpha1.Host) []netip.Prefix {
	out := []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"), netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("224.0.0.0/3"),
	}
	if cluster.IsValid() && cluster.Addr().Is4() {
		out = append(out, netip.PrefixFrom(cluster.Masked().Addr(), 32), netip.PrefixFrom(ipam.Last(cluster), 32))
	}
	for i := range hosts {
		p, err := netip.ParsePrefix(hosts[i].Spec.SandboxCIDR)
		if err != nil || !p.Addr().Is4() || p.Bits() > 30 {
			continue
		}
		first := p.Masked().Addr()
		out = append(out, netip.PrefixFrom(first, 32), netip.PrefixFrom(first.Next(), 32), netip.PrefixFrom(ipam.Last(p), 32))
	}
	return out
}
