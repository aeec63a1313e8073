package network

import (
	"net"
	"net/netip"

	"hearth.dev/hearth/api/v1alpha1"
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
