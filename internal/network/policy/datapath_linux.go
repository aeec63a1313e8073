package policy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

// Endpoint flags, as policy.c has them.
const (
	flagIngressIsolated = 1
	flagEgressIsolated  = 2
	flagNoNAT           = 4
)

// Flags of special addresses (SetSpecial).
const (
	// Forbidden: a sandbox never sends to it, whatever the policies say.
	Forbidden uint32 = 1
	// Trusted: the hosts' own addresses, which may open connections to
	// sandboxes (the ingress, probes) whatever the policies say.
	Trusted uint32 = 2
)

// Datapath holds the loaded programs and maps of one host and the links
// that attach them to its taps.
type Datapath struct {
	mu    sync.Mutex
	objs  policyObjects
	links map[int][2]link.Link
	// written are the rule keys written for each endpoint address, by
	// direction (0 egress, 1 ingress), so that an update deletes exactly
	// what is gone.
	written [2]map[netip.Addr][]policyRuleKey
	eps     map[int]netip.Addr
	special map[netip.Prefix]uint32
}

// Load loads the programs and maps into the kernel.
func Load() (*Datapath, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("lift the memlock limit for eBPF maps: %w", err)
	}
	d := &Datapath{links: map[int][2]link.Link{}, written: [2]map[netip.Addr][]policyRuleKey{{}, {}}, eps: map[int]netip.Addr{}}
	if err := loadPolicyObjects(&d.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load the policy programs: %+v", ve)
		}
		return nil, fmt.Errorf("load the policy programs: %w", err)
	}
	return d, nil
}

// Close detaches every program and frees the maps.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for ifindex, l := range d.links {
		errs = append(errs, l[0].Close(), l[1].Close())
		delete(d.links, ifindex)
	}
	errs = append(errs, d.objs.Close())
	return errors.Join(errs...)
}

// be32 is an IPv4 address as the programs compare it: in network byte
// order in memory.
func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// SetNetwork tells the programs the sandboxes' gateway (reachable for
// ICMP and DNS only) and the cluster's sandbox range (what a sandbox
// without NAT may reach).
func (d *Datapath) SetNetwork(gateway netip.Addr, cluster netip.Prefix) error {
	var m [4]byte
	for i := 0; i < cluster.Bits(); i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	cfg := policyConfig{Gateway: be32(gateway), ClusterNet: be32(cluster.Masked().Addr()), ClusterMask: binary.NativeEndian.Uint32(m[:])}
	return d.objs.Settings.Put(uint32(0), cfg)
}

// SetSpecial replaces the special addresses: prefix → Forbidden|Trusted.
func (d *Datapath) SetSpecial(special map[netip.Prefix]uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for p, f := range special {
		k := policyAddrKey{Prefixlen: uint32(p.Bits()), Addr: be32(p.Masked().Addr())}
		errs = append(errs, d.objs.Special.Put(k, f))
	}
	for p := range d.special {
		if _, ok := special[p]; !ok {
			k := policyAddrKey{Prefixlen: uint32(p.Bits()), Addr: be32(p.Masked().Addr())}
			errs = append(errs, d.objs.Special.Delete(k))
		}
	}
	d.special = special
	return errors.Join(errs...)
}

// Attach puts the programs on a sandbox's tap (once) and sets its
// endpoint: its address and whether it may reach the outside.
func (d *Datapath) Attach(ifindex int, addr netip.Addr, nat bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ep policyEndpoint
	_ = d.objs.Endpoints.Lookup(uint32(ifindex), &ep) // keep its isolation flags
	ep.Addr = be32(addr)
	ep.Flags &^= flagNoNAT
	if !nat {
		ep.Flags |= flagNoNAT
	}
	// The endpoint first: until it is there, the programs drop everything.
	if err := d.objs.Endpoints.Put(uint32(ifindex), ep); err != nil {
		return fmt.Errorf("set endpoint %d: %w", ifindex, err)
	}
	d.eps[ifindex] = addr
	if _, ok := d.links[ifindex]; ok {
		return nil
	}
	in, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.objs.SandboxEgress, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return fmt.Errorf("attach to interface %d: %w", ifindex, err)
	}
	out, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.objs.SandboxIngress, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		return errors.Join(fmt.Errorf("attach to interface %d: %w", ifindex, err), in.Close())
	}
	d.links[ifindex] = [2]link.Link{in, out}
	return nil
}

// Detach removes the programs from a tap and forgets its endpoint and
// rules.
func (d *Datapath) Detach(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if l, ok := d.links[ifindex]; ok {
		errs = append(errs, l[0].Close(), l[1].Close())
		delete(d.links, ifindex)
	}
	if addr, ok := d.eps[ifindex]; ok {
		for dir := range d.written {
			errs = append(errs, d.replace(dir, addr, nil))
		}
		delete(d.eps, ifindex)
	}
	if err := d.objs.Endpoints.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// SetPolicy applies a sandbox's compiled policy to its endpoint. Rules
// are written before a direction is isolated and removed after it is not,
// and each update writes the new entries before it deletes the stale
// ones, so that traffic that stays allowed is never dropped on the way.
func (d *Datapath) SetPolicy(ifindex int, r Result) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	addr, ok := d.eps[ifindex]
	if !ok {
		return fmt.Errorf("interface %d has no endpoint", ifindex)
	}
	var ep policyEndpoint
	if err := d.objs.Endpoints.Lookup(uint32(ifindex), &ep); err != nil {
		return fmt.Errorf("endpoint %d: %w", ifindex, err)
	}
	flags := ep.Flags &^ (flagIngressIsolated | flagEgressIsolated)
	if r.IngressIsolated {
		flags |= flagIngressIsolated
	}
	if r.EgressIsolated {
		flags |= flagEgressIsolated
	}
	if err := d.replace(0, addr, r.Egress); err != nil {
		return err
	}
	if err := d.replace(1, addr, r.Ingress); err != nil {
		return err
	}
	if flags != ep.Flags {
		ep.Flags = flags
		if err := d.objs.Endpoints.Put(uint32(ifindex), ep); err != nil {
			return fmt.Errorf("endpoint %d: %w", ifindex, err)
		}
	}
	return nil
}

// replace makes rules the entries of addr in direction dir's map.
func (d *Datapath) replace(dir int, addr netip.Addr, rules Rules) error {
	m := d.objs.EgressRules
	if dir == 1 {
		m = d.objs.IngressRules
	}
	keys := make([]policyRuleKey, 0, len(rules))
	var errs []error
	for p, ports := range rules {
		k := policyRuleKey{Prefixlen: 32 + uint32(p.Bits()), Ep: be32(addr), Peer: be32(p.Masked().Addr())}
		var v policyRule
		v.N = uint32(min(len(ports), MaxPorts))
		for i := 0; i < int(v.N); i++ {
			v.R[i].Proto, v.R[i].Lo, v.R[i].Hi = ports[i].Proto, ports[i].Lo, ports[i].Hi
		}
		if err := m.Put(k, v); err != nil {
			errs = append(errs, fmt.Errorf("rule %s → %s: %w", addr, p, err))
			continue
		}
		keys = append(keys, k)
	}
	keep := make(map[policyRuleKey]bool, len(keys))
	for _, k := range keys {
		keep[k] = true
	}
	for _, k := range d.written[dir][addr] {
		if !keep[k] {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if len(keys) == 0 {
		delete(d.written[dir], addr)
	} else {
		d.written[dir][addr] = keys
	}
	return errors.Join(errs...)
}
