package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// GatewayDevice holds the gateway address on each host.
const GatewayDevice = "hearth0"

// TapMAC is the host side's address on every tap.
var TapMAC = net.HardwareAddr{0xee, 0xee, 0xee, 0xee, 0xee, 0xee}

// routeProtocol marks the routes hearth installs, so that it removes only
// its own (rtnetlink protocol numbers above 4 are free to use).
const routeProtocol netlink.RouteProtocol = 0x4e

// Host is this host's sandbox network.
type Host struct {
	CIDR    netip.Prefix // this host's range
	Cluster netip.Prefix // all hosts' ranges
}

// Gateway is the sandboxes' gateway and DNS server: the range's first
// address.
func (h *Host) Gateway() netip.Addr { return h.CIDR.Masked().Addr().Next() }

// Setup prepares the host: forwarding on, the gateway device, NAT. It is
// idempotent.
func (h *Host) Setup() error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("turn on IPv4 forwarding: %w", err)
	}
	link, err := netlink.LinkByName(GatewayDevice)
	if err != nil {
		// A bridge without ports holds the address: a dummy device
		// would do, but kernels built without CONFIG_DUMMY (this project's
		// CI machines) have none, and every host that runs VMs has bridges.
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: GatewayDevice}}); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add %s: %w", GatewayDevice, err)
		}
		if link, err = netlink.LinkByName(GatewayDevice); err != nil {
			return err
		}
	}
	gw := &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(h.Gateway(), 32))}
	if err := netlink.AddrReplace(link, gw); err != nil {
		return fmt.Errorf("add the gateway address %s: %w", h.Gateway(), err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return err
	}
	return h.nat()
}

// nat installs the masquerade rule: what a sandbox of this host sends
// beyond the cluster's range leaves with the host's address. (A sandbox
// without NAT never gets that far: its tap's program drops it.)
func (h *Host) nat() error {
	rules := fmt.Sprintf(`table ip hearth
delete table ip hearth
table ip hearth {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr %s ip daddr != %s masquerade
	}
}
`, h.CIDR.Masked(), h.Cluster.Masked())
	if _, err := exec.LookPath("nft"); err != nil {
		return fmt.Errorf("nft is not installed (apt-get install nftables), or run the node with --network=false")
	}
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, out)
	}
	return nil
}

// AddTap makes (or finds) a sandbox's tap and routes addr to it; it
// returns the tap's interface index.
func (h *Host) AddTap(name string, addr netip.Addr) (int, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: TapMAC},
			Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
		// A persistent tap outlives the agent's file descriptor: QEMU
		// opens it by name.
		tap.NonPersist = false
		if err := netlink.LinkAdd(tap); err != nil && !errors.Is(err, unix.EEXIST) {
			return 0, fmt.Errorf("add tap %s: %w", name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return 0, err
		}
	}
	return h.Plug(link, addr)
}

// Plug routes a sandbox's address to its host-side device (a tap, or a
// veth in tests and benchmarks) and returns the device's index.
func (h *Host) Plug(link netlink.Link, addr netip.Addr) (int, error) {
	name := link.Attrs().Name
	if err := netlink.LinkSetHardwareAddr(link, TapMAC); err != nil {
		return 0, fmt.Errorf("%s: %w", name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return 0, fmt.Errorf("%s up: %w", name, err)
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixNet(netip.PrefixFrom(addr, 32)), Scope: netlink.SCOPE_LINK,
		Src: net.IP(h.Gateway().AsSlice()), Protocol: routeProtocol}
	if err := netlink.RouteReplace(r); err != nil {
		return 0, fmt.Errorf("route %s to %s: %w", addr, name, err)
	}
	return link.Attrs().Index, nil
}

// DelTap removes a tap (and with it its route); a missing one is fine.
func DelTap(name string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete tap %s: %w", name, err)
	}
	return nil
}

// Taps lists the interfaces whose names start with prefix.
func Taps(prefix string) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, prefix) {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// SyncPeers makes the routes to other hosts' ranges exactly peers: range
// → the host's address.
func SyncPeers(peers map[netip.Prefix]netip.Addr) error {
	var errs []error
	for p, via := range peers {
		r := &netlink.Route{Dst: prefixNet(p), Gw: net.IP(via.AsSlice()), Protocol: routeProtocol}
		if err := netlink.RouteReplace(r); err != nil {
			errs = append(errs, fmt.Errorf("route %s via %s: %w", p, via, err))
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, r := range routes {
		if r.Gw == nil || r.Dst == nil {
			continue // a sandbox's route
		}
		p, ok := netipPrefix(r.Dst)
		if _, keep := peers[p]; ok && !keep {
			errs = append(errs, netlink.RouteDel(&r))
		}
	}
	return errors.Join(errs...)
}

// LocalPrefixes are the addresses of this host's interfaces, as /32s, and
// the networks they are on (its management networks), leaving out the
// gateway device and loopback.
func LocalPrefixes() (addrs, networks []netip.Prefix, err error) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, nil, err
	}
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		addrs = append(addrs, netip.PrefixFrom(ip, 32))
		if ip.IsLoopback() {
			continue
		}
		if l, err := netlink.LinkByIndex(a.LinkIndex); err == nil && l.Attrs().Name == GatewayDevice {
			continue
		}
		if p, ok := netipPrefix(a.IPNet); ok && p.Bits() < 32 {
			networks = append(networks, p.Masked())
		}
	}
	return addrs, networks, nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	ip, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	bits, _ := n.Mask.Size()
	return netip.PrefixFrom(ip, bits), true
}

// bpfFSMagic is the bpf filesystem's statfs type.
const bpfFSMagic = 0xcafe4a11

// EnsureBPFFS mounts a bpf filesystem at dir unless one is there: pins
// outlive processes only on one.
func EnsureBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err == nil && fs.Type == bpfFSMagic {
		return nil
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount a bpf filesystem at %s: %w", dir, err)
	}
	return nil
}
