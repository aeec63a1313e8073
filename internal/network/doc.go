// Package network is a host's side of the sandboxes' network.
//
// Each host gets a sandbox range from the control plane (Host
// spec.sandboxCIDR, internal/network/ipam); each sandbox a tap device and
// an address from it, leased through the API (the Sandbox's status.ip,
// written before its VM starts). The host routes rather than bridges:
//
//   - a /32 route per sandbox to its tap, and the range's first address
//     (the gateway, also the DNS server) on a device of its own, hearth0 (a
//     bridge without ports). Every
//     guest has a /32 address and a default route to the gateway, so that
//     a guest never talks to another on layer 2: there is no bridge for
//     ARP spoofing or MAC flooding, and every packet a sandbox sends
//     crosses its tap, where the policy programs (internal/network/policy)
//     see it. Each tap has the same MAC (ee:ee:ee:ee:ee:ee, as Calico's
//     veths), so that a guest restored from a snapshot on another tap or
//     host still reaches its gateway with the neighbour entry it saved.
//   - one route per other host, its range via its address (as flannel's
//     host-gw): the hosts must share a layer-2 network, or an underlay that
//     routes the ranges.
//   - NAT (masquerade) for what leaves the cluster's range, in an nftables
//     table of its own (ip hearth).
package network
