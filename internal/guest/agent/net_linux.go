package agent

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"hearth.dev/hearth/internal/guest/protocol"
)

// setupNetwork gives eth0 the sandbox's /32 address, a route to the
// gateway and a default route through it, and writes /etc/resolv.conf and
// /etc/hosts in the sandbox's root. It replaces whatever eth0 had, so
// that a VM restored from a snapshot takes its new identity.
func setupNetwork(n *protocol.Network, hostname string) error {
	addr, err := netlink.ParseAddr(n.Address)
	if err != nil {
		return fmt.Errorf("address %q: %w", n.Address, err)
	}
	gw := net.ParseIP(n.Gateway)
	if gw == nil {
		return fmt.Errorf("gateway %q is not an address", n.Gateway)
	}
	link, err := waitLink("eth0", 5*time.Second)
	if err != nil {
		return err
	}
	old, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, a := range old {
		if !a.IPNet.IP.Equal(addr.IP) {
			_ = netlink.AddrDel(link, &a)
		}
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("eth0 address: %w", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("eth0 up: %w", err)
	}
	idx := link.Attrs().Index
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("route to the gateway: %w", err)
	}
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: idx, Gw: gw}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	var resolv strings.Builder
	for _, s := range n.DNS {
		fmt.Fprintf(&resolv, "nameserver %s\n", s)
	}
	if len(n.Search) > 0 {
		fmt.Fprintf(&resolv, "search %s\n", strings.Join(n.Search, " "))
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost\n%s\t%s\n", addr.IP, hostname)
	if err := os.MkdirAll("/etc", 0o755); err != nil {
		return err
	}
	for name, content := range map[string]string{"/etc/resolv.conf": resolv.String(), "/etc/hosts": hosts} {
		_ = os.Remove(name) // a symlink into a resolver's runtime directory, in some images
		if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// waitLink waits for the interface to be probed.
func waitLink(name string, timeout time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(timeout)
	for {
		l, err := netlink.LinkByName(name)
		if err == nil {
			return l, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no %s: %w", name, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
