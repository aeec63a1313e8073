// Package ipam hands out addresses: each host's sandbox range from the
// cluster's (the control plane's controller, controller.go), and each
// sandbox's address from its host's range (Pool, in the node agent).
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// ErrFull means a range has no free subnet or address left.
var ErrFull = errors.New("no free addresses")

// NextRange is the first subnet of cluster with the given prefix length
// that overlaps none of used.
func NextRange(cluster netip.Prefix, bits int, used []netip.Prefix) (netip.Prefix, error) {
	cluster = cluster.Masked()
	if bits < cluster.Bits() || bits > 30 {
		return netip.Prefix{}, fmt.Errorf("a /%d per host does not fit the cluster's %s", bits, cluster)
	}
	size := uint32(1) << (32 - bits)
	n := uint32(1) << (bits - cluster.Bits())
	base := u32(cluster.Addr())
	for i := uint32(0); i < n; i++ {
		p := netip.PrefixFrom(addr(base+i*size), bits)
		free := true
		for _, u := range used {
			if u.Overlaps(p) {
				free = false
				break
			}
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("%w: every /%d of %s is taken", ErrFull, bits, cluster)
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Quarantine is how long a freed address waits before it goes to another
// sandbox: long enough for every host to hear that its sandbox is gone and
// forget the flows other sandboxes had with it (and past the data path's
// two minutes for an idle UDP or ICMP flow), so that the next tenant at the
// address inherits none of them.
//
// A range whose free addresses are all in quarantine (a tenant that starts
// and deletes sandboxes in a loop could hold a whole range so) hands out
// the one freed longest ago, once MinQuarantine has passed: by then the
// hosts have long heard of the deletion; the full two minutes only cover
// a host slow to hear.
const (
	Quarantine    = 2 * time.Minute
	MinQuarantine = 15 * time.Second
)

// Pool is a host's range: the first address is the gateway, the last the
// broadcast address; the rest go to sandboxes, one per owner (a sandbox's
// UID), lowest free first; an address freed less than Quarantine ago is
// held back while another is free (then the oldest freed, past
// MinQuarantine).
type Pool struct {
	mu     sync.Mutex
	cidr   netip.Prefix
	owners map[netip.Addr]string
	byUID  map[string]netip.Addr
	freed  map[netip.Addr]time.Time
	// Now is the clock (tests set their own).
	Now func() time.Time
}

// NewPool is an empty pool over cidr.
func NewPool(cidr netip.Prefix) *Pool {
	return &Pool{cidr: cidr.Masked(), owners: map[netip.Addr]string{}, byUID: map[string]netip.Addr{}, freed: map[netip.Addr]time.Time{}, Now: time.Now}
}

// Gateway is the range's first address.
func (p *Pool) Gateway() netip.Addr { return p.cidr.Addr().Next() }

// Reserve records that owner holds a; it fails if another owner does or
// a is not a sandbox address of the range.
func (p *Pool) Reserve(a netip.Addr, owner string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.usable(a) {
		return fmt.Errorf("%s is not a sandbox address of %s", a, p.cidr)
	}
	if o, ok := p.owners[a]; ok && o != owner {
		return fmt.Errorf("%s is already leased to %s", a, o)
	}
	if prev, ok := p.byUID[owner]; ok && prev != a {
		delete(p.owners, prev)
	}
	p.owners[a], p.byUID[owner] = owner, a
	return nil
}

// Allocate returns owner's address, leasing the lowest free one if it
// has none.
func (p *Pool) Allocate(owner string) (netip.Addr, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a, ok := p.byUID[owner]; ok {
		return a, nil
	}
	now := p.Now()
	held := 0
	var oldest netip.Addr
	for a := p.Gateway().Next(); p.usable(a); a = a.Next() {
		if _, taken := p.owners[a]; taken {
			continue
		}
		if t, ok := p.freed[a]; ok {
			if age := now.Sub(t); age < Quarantine && age >= 0 {
				held++
				if age >= MinQuarantine && (!oldest.IsValid() || t.Before(p.freed[oldest])) {
					oldest = a
				}
				continue
			}
			delete(p.freed, a)
		}
		p.lease(a, owner)
		return a, nil
	}
	if oldest.IsValid() {
		p.lease(oldest, owner)
		return oldest, nil
	}
	if held > 0 {
		return netip.Addr{}, fmt.Errorf("%w in %s (%d freed in the last %s are held back)", ErrFull, p.cidr, held, MinQuarantine)
	}
	return netip.Addr{}, fmt.Errorf("%w in %s", ErrFull, p.cidr)
}

func (p *Pool) lease(a netip.Addr, owner string) {
	delete(p.freed, a)
	p.owners[a], p.byUID[owner] = owner, a
}

// Release frees owner's address, if it has one.
func (p *Pool) Release(owner string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a, ok := p.byUID[owner]; ok {
		delete(p.owners, a)
		delete(p.byUID, owner)
		p.freed[a] = p.Now()
	}
}

// usable: inside the range, past the gateway, before broadcast.
func (p *Pool) usable(a netip.Addr) bool {
	return p.cidr.Contains(a) && a.Compare(p.Gateway()) > 0 && a.Compare(Last(p.cidr)) < 0
}

// Last is an IPv4 prefix's last address (its broadcast address).
func Last(p netip.Prefix) netip.Addr {
	p = p.Masked()
	return addr(u32(p.Addr()) | (1<<(32-p.Bits()) - 1))
}

// CheckSandboxAddr is nil if ip is an address of cidr (a host's range)
// that a sandbox may have: not its network, gateway (its first two) or
// broadcast address.
func CheckSandboxAddr(ip, cidr string) error {
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		return fmt.Errorf("%s: the host has no sandbox range", ip)
	}
	a, err := netip.ParseAddr(ip)
	if err != nil || !p.Contains(a) || a == p.Masked().Addr() || a == p.Masked().Addr().Next() || a == Last(p) {
		return fmt.Errorf("%s is not a sandbox address of the host's range %s", ip, p)
	}
	return nil
}
