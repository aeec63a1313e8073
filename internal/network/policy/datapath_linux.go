package policy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
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
// that attach them to its taps. With a pin directory (on a bpf
// filesystem), maps and links are pinned there: when the process ends the
// programs stay on the taps, enforcing the last policy, and the next Load
// takes over the maps and links it finds.
type Datapath struct {
	mu     sync.Mutex
	pinDir string
	objs   policyObjects
	links  map[int][2]link.Link
	// written are the rule keys written for each endpoint address, by
	// direction (0 egress, 1 ingress), so that an update deletes exactly
	// what is gone.
	written [2]map[netip.Addr][]policyRuleKey
	eps     map[int]netip.Addr
	applied map[int]Result // the last SetPolicy of each endpoint
	special map[netip.Prefix]uint32
	// tables are the endpoints' connection tables (conntrack's inner
	// maps), made from ctSpec.
	tables map[int]*ebpf.Map
	ctSpec *ebpf.MapSpec
}

// TableEntries is what one sandbox's connection table holds (policy.c's
// CT_ENTRIES): a flow takes two entries, and past that the sandbox's least
// recently used flows are evicted, not another's.
const TableEntries = 8192

// Flows counts the entries of an endpoint's connection table.
func (d *Datapath) Flows(ifindex int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t, ok := d.tables[ifindex]
	if !ok {
		return 0, fmt.Errorf("interface %d has no connection table", ifindex)
	}
	n := 0
	var k ctKey
	var v uint64
	it := t.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// ctKey is policy.c's struct ct_key (bpf2go cannot see it: the tables
// name its size only).
type ctKey struct {
	Saddr, Daddr uint32
	Sport, Dport uint16
	Proto, Dir   uint8
	_            [2]byte
}

// Load loads the programs and maps into the kernel, pinned in pinDir
// unless it is empty.
func Load(pinDir string) (*Datapath, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("lift the memlock limit for eBPF maps: %w", err)
	}
	d := &Datapath{pinDir: pinDir, links: map[int][2]link.Link{}, written: [2]map[netip.Addr][]policyRuleKey{{}, {}}, eps: map[int]netip.Addr{}, applied: map[int]Result{}, special: map[netip.Prefix]uint32{},
		tables: map[int]*ebpf.Map{}}
	spec, err := loadPolicy()
	if err != nil {
		return nil, err
	}
	d.ctSpec = spec.Maps["conntrack"].InnerMap.Copy()
	d.ctSpec.Name = "hearth_ct"
	if pinDir == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	} else if err := os.MkdirAll(pinDir, 0o700); err != nil {
		return nil, fmt.Errorf("pin directory: %w", err)
	}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}})
	if err != nil && pinDir != "" && errors.Is(err, ebpf.ErrMapIncompatible) {
		// Maps pinned by another version of the programs: start afresh
		// (their links go with them; the caller attaches again).
		_ = os.RemoveAll(pinDir)
		if err = os.MkdirAll(pinDir, 0o700); err == nil {
			err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}})
		}
	}
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load the policy programs: %+v", ve)
		}
		return nil, fmt.Errorf("load the policy programs: %w", err)
	}
	if err := d.recover(); err != nil {
		return nil, errors.Join(err, d.objs.Close())
	}
	return d, nil
}

// recover reads back what pinned maps hold (endpoints, rules written,
// special addresses, so that the next update removes what is stale) and
// takes over the pinned links of taps that still exist, updating them to
// these programs; pins of taps gone are removed.
func (d *Datapath) recover() error {
	var ifindex uint32
	var ep policyEndpoint
	var gone []int
	for it := d.objs.Endpoints.Iterate(); it.Next(&ifindex, &ep); {
		d.eps[int(ifindex)] = addrOf(ep.Addr)
		if _, err := net.InterfaceByIndex(int(ifindex)); err != nil {
			gone = append(gone, int(ifindex))
		}
	}
	for idx := range d.eps {
		var table *ebpf.Map
		if err := d.objs.Conntrack.Lookup(uint32(idx), &table); err == nil {
			d.tables[idx] = table
		}
	}
	for dir, m := range []*ebpf.Map{d.objs.EgressRules, d.objs.IngressRules} {
		var k policyRuleKey
		var v policyRule
		for it := m.Iterate(); it.Next(&k, &v); {
			a := addrOf(k.Ep)
			d.written[dir][a] = append(d.written[dir][a], k)
		}
	}
	var sk policyAddrKey
	var flags uint32
	for it := d.objs.Special.Iterate(); it.Next(&sk, &flags); {
		d.special[netip.PrefixFrom(addrOf(sk.Addr), int(sk.Prefixlen))] = flags
	}
	// Endpoints of taps removed while no one watched.
	for _, idx := range gone {
		addr := d.eps[idx]
		delete(d.eps, idx)
		_ = d.objs.Endpoints.Delete(uint32(idx))
		d.dropTable(idx)
		if !slices.Contains(slices.Collect(maps.Values(d.eps)), addr) {
			for dir := range d.written {
				_ = d.replace(dir, addr, nil)
			}
		}
	}
	if d.pinDir == "" {
		return nil
	}
	entries, err := os.ReadDir(d.pinDir)
	if err != nil {
		return err
	}
	found := map[int][2]link.Link{}
	for _, e := range entries {
		idx, side, ok := parseLinkPin(e.Name())
		if !ok {
			continue
		}
		path := filepath.Join(d.pinDir, e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			_ = os.Remove(path)
			continue
		}
		prog := d.objs.SandboxEgress
		if side == 1 {
			prog = d.objs.SandboxIngress
		}
		if _, err := net.InterfaceByIndex(idx); err != nil || l.Update(prog) != nil {
			// The tap is gone (and the link with it).
			_ = l.Unpin()
			_ = l.Close()
			continue
		}
		pair := found[idx]
		pair[side] = l
		found[idx] = pair
	}
	for idx, pair := range found {
		if pair[0] != nil && pair[1] != nil {
			d.links[idx] = pair
			continue
		}
		for _, l := range pair {
			if l != nil {
				_ = l.Unpin()
				_ = l.Close()
			}
		}
	}
	return nil
}

func linkPin(ifindex, side int) string { return fmt.Sprintf("link-%d-%d", ifindex, side) }

func parseLinkPin(name string) (ifindex, side int, ok bool) {
	_, err := fmt.Sscanf(name, "link-%d-%d", &ifindex, &side)
	return ifindex, side, err == nil && (side == 0 || side == 1)
}

func addrOf(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// Close lets go of the programs and maps: unpinned ones are detached and
// freed, pinned ones stay for the next Load.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for ifindex, l := range d.links {
		errs = append(errs, l[0].Close(), l[1].Close())
		delete(d.links, ifindex)
	}
	for _, t := range d.tables {
		errs = append(errs, t.Close())
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
	mask := net.CIDRMask(cluster.Bits(), 32)
	cfg := policyConfig{Gateway: be32(gateway), ClusterNet: be32(cluster.Masked().Addr()), ClusterMask: binary.NativeEndian.Uint32(mask)}
	return d.objs.Settings.Put(uint32(0), cfg)
}

// SpecialEntries is how many special addresses the programs hold (the
// special map's size in bpf/policy.c).
const SpecialEntries = 1 << 16

// SetSpecial replaces the special addresses: prefix → Forbidden|Trusted.
// Stale entries go first, so that a full map never keeps the new ones
// out; a set larger than the map is refused whole, and so is the rest of
// a set after a write fails: the caller retries, and the old entries that
// are still wanted stay in force meanwhile.
func (d *Datapath) SetSpecial(special map[netip.Prefix]uint32) error {
	if len(special) > SpecialEntries {
		return fmt.Errorf("%d special addresses, more than the %d the datapath holds", len(special), SpecialEntries)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	key := func(p netip.Prefix) policyAddrKey {
		return policyAddrKey{Prefixlen: uint32(p.Bits()), Addr: be32(p.Masked().Addr())}
	}
	for p := range d.special {
		if _, ok := special[p]; !ok {
			if err := d.objs.Special.Delete(key(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove special address %s: %w", p, err)
			}
			delete(d.special, p)
		}
	}
	for p, f := range special {
		if old, ok := d.special[p]; ok && old == f {
			continue
		}
		if err := d.objs.Special.Put(key(p), f); err != nil {
			return fmt.Errorf("special address %s: %w", p, err)
		}
		d.special[p] = f
	}
	return nil
}

// Attach puts the programs on a sandbox's tap (once) and sets its
// endpoint: its address and whether it may reach the outside.
func (d *Datapath) Attach(ifindex int, addr netip.Addr, nat bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ep policyEndpoint
	_ = d.objs.Endpoints.Lookup(uint32(ifindex), &ep) // keep its isolation flags
	if old, ok := d.eps[ifindex]; ok && old != addr {
		d.dropTable(ifindex) // another sandbox's flows
	}
	if _, ok := d.tables[ifindex]; !ok {
		table, err := ebpf.NewMap(d.ctSpec)
		if err != nil {
			return fmt.Errorf("connection table for interface %d: %w", ifindex, err)
		}
		if err := d.objs.Conntrack.Put(uint32(ifindex), table); err != nil {
			_ = table.Close()
			return fmt.Errorf("connection table for interface %d: %w", ifindex, err)
		}
		d.tables[ifindex] = table
	}
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
	var pair [2]link.Link
	for side, a := range []struct {
		prog *ebpf.Program
		at   ebpf.AttachType
	}{{d.objs.SandboxEgress, ebpf.AttachTCXIngress}, {d.objs.SandboxIngress, ebpf.AttachTCXEgress}} {
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: a.prog, Attach: a.at})
		if err == nil && d.pinDir != "" {
			path := filepath.Join(d.pinDir, linkPin(ifindex, side))
			_ = os.Remove(path) // a stale pin of an interface gone, whose index came back
			if err = l.Pin(path); err != nil {
				_ = l.Close()
			}
		}
		if err != nil {
			for _, done := range pair[:side] {
				_ = done.Unpin()
				_ = done.Close()
			}
			return fmt.Errorf("attach to interface %d: %w", ifindex, err)
		}
		pair[side] = l
	}
	d.links[ifindex] = pair
	return nil
}

// Detach removes the programs from a tap and forgets its endpoint and
// rules.
func (d *Datapath) Detach(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if l, ok := d.links[ifindex]; ok {
		for _, x := range l {
			if d.pinDir != "" {
				errs = append(errs, x.Unpin())
			}
			errs = append(errs, x.Close())
		}
		delete(d.links, ifindex)
	}
	if err := d.objs.Endpoints.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	d.dropTable(ifindex)
	if addr, ok := d.eps[ifindex]; ok {
		for dir := range d.written {
			errs = append(errs, d.replace(dir, addr, nil))
		}
		delete(d.eps, ifindex)
		// The address goes to another sandbox one day: the flows the
		// other sandboxes here had with this one must not be its.
		errs = append(errs, d.forget(func(a netip.Addr) bool { return a == addr }))
	}
	delete(d.applied, ifindex)
	return errors.Join(errs...)
}

// dropTable removes an endpoint's connection table (the kernel frees it
// with the last reference).
func (d *Datapath) dropTable(ifindex int) {
	_ = d.objs.Conntrack.Delete(uint32(ifindex))
	if t, ok := d.tables[ifindex]; ok {
		_ = t.Close()
		delete(d.tables, ifindex)
	}
}

// Forget deletes, from every endpoint's connection table, the flows with
// a peer that gone reports: sandboxes gone elsewhere in the cluster,
// whose addresses may go to other tenants.
func (d *Datapath) Forget(gone func(netip.Addr) bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.forget(gone)
}

func (d *Datapath) forget(gone func(netip.Addr) bool) error {
	var errs []error
	for _, t := range d.tables {
		var k ctKey
		var v uint64
		var stale []ctKey
		it := t.Iterate()
		for it.Next(&k, &v) {
			if gone(addrOf(k.Saddr)) || gone(addrOf(k.Daddr)) {
				stale = append(stale, k)
			}
		}
		errs = append(errs, it.Err())
		for _, k := range stale {
			if err := t.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// SetPolicy applies a sandbox's compiled policy to its endpoint: the new
// rule entries first, then the isolation flags, then the stale entries go,
// so that traffic allowed before and after is never dropped on the way (a
// direction isolated with no rules yet, or rules gone while it still is).
// A policy the endpoint already has is not written again.
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
	if old, ok := d.applied[ifindex]; ok && flags == ep.Flags && reflect.DeepEqual(old, r) {
		return nil // what the maps hold already
	}
	egress, err := d.write(0, addr, r.Egress)
	if err != nil {
		return err
	}
	ingress, err := d.write(1, addr, r.Ingress)
	if err != nil {
		return err
	}
	if flags != ep.Flags {
		ep.Flags = flags
		if err := d.objs.Endpoints.Put(uint32(ifindex), ep); err != nil {
			return fmt.Errorf("endpoint %d: %w", ifindex, err)
		}
	}
	if err := errors.Join(d.prune(0, addr, egress), d.prune(1, addr, ingress)); err != nil {
		return err
	}
	d.applied[ifindex] = r
	return nil
}

// replace makes rules the entries of addr in direction dir's map.
func (d *Datapath) replace(dir int, addr netip.Addr, rules Rules) error {
	keys, err := d.write(dir, addr, rules)
	return errors.Join(err, d.prune(dir, addr, keys))
}

func (d *Datapath) rulesMap(dir int) *ebpf.Map {
	if dir == 1 {
		return d.objs.IngressRules
	}
	return d.objs.EgressRules
}

// write puts rules into direction dir's map for addr and returns their
// keys.
func (d *Datapath) write(dir int, addr netip.Addr, rules Rules) ([]policyRuleKey, error) {
	m := d.rulesMap(dir)
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
	return keys, errors.Join(errs...)
}

// prune deletes the entries of addr that write did not just write, and
// records keys as addr's.
func (d *Datapath) prune(dir int, addr netip.Addr, keys []policyRuleKey) error {
	m := d.rulesMap(dir)
	keep := make(map[policyRuleKey]bool, len(keys))
	for _, k := range keys {
		keep[k] = true
	}
	var errs []error
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
