// Package policy enforces NetworkPolicies with eBPF: two tcx programs on
// each sandbox's tap device (policy.c, compiled by bpf2go and committed),
// and a compiler from the API's policies to the programs' maps.
//
// The compiler (this file) is plain Go and runs anywhere; the data path
// (datapath_linux.go) needs Linux, root and a kernel with tcx (6.6+).
package policy

import (
	"net/netip"
	"slices"
	"sort"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"hearth.dev/hearth/api/v1alpha1"
)

// MaxPorts is how many port ranges one peer prefix of a sandbox holds (the
// programs' array); more are dropped (the rule denies rather than allows
// too much) and Result.Truncated says so.
const MaxPorts = 16

// IP protocol numbers.
const (
	ProtoAny  = 0
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
)

// PortRange is a protocol and an inclusive range of destination ports;
// Proto 0 is every protocol.
type PortRange struct {
	Proto  uint8
	Lo, Hi uint16
}

var anyPort = PortRange{Proto: ProtoAny, Lo: 0, Hi: 65535}

// Rules map peer prefixes to what the sandbox may exchange with them; the
// longest prefix that holds an address decides (an empty list denies).
type Rules map[netip.Prefix][]PortRange

// Sandbox is what the compiler needs of a sandbox.
type Sandbox struct {
	Namespace, Name string
	Labels          map[string]string
	IP              netip.Addr
	Ports           []v1alpha1.SandboxPort
}

// Result is one sandbox's policy: whether each direction is isolated and,
// if it is, what it allows.
type Result struct {
	IngressIsolated, EgressIsolated bool
	Ingress, Egress                 Rules
	Truncated                       bool
}

// Cluster is everything policies are evaluated against.
type Cluster struct {
	Policies  []v1alpha1.NetworkPolicy
	Sandboxes []Sandbox
	// Namespaces' labels, by name.
	Namespaces map[string]map[string]string
	// IsolateNamespaces is the cluster's namespace isolation: a sandbox
	// that no policy isolates for ingress still accepts new connections
	// from the sandboxes of Range only if they are of its own namespace
	// (and from anything outside Range: the hosts, the internet's
	// replies). Another namespace's sandboxes reach it only through a
	// policy of its own namespace that allows them.
	IsolateNamespaces bool
	Range             netip.Prefix
}

// atom is a set of addresses (a CIDR minus excepts) and the ports allowed
// to them.
type atom struct {
	cidr   netip.Prefix
	except []netip.Prefix
	ports  []PortRange
}

var everywhere = netip.MustParsePrefix("0.0.0.0/0")

// Compile computes the policy of sandbox sb.
func Compile(c *Cluster, sb Sandbox) Result {
	var r Result
	var in, out []atom
	for i := range c.Policies {
		p := &c.Policies[i]
		if p.Namespace != sb.Namespace || !matches(&p.Spec.SandboxSelector, sb.Labels) {
			continue
		}
		ingress, egress := directions(&p.Spec)
		if ingress {
			r.IngressIsolated = true
			for _, rule := range p.Spec.Ingress {
				ports := resolvePorts(rule.Ports, sb)
				for _, a := range c.peers(p.Namespace, rule.From) {
					a.ports = ports
					in = append(in, a)
				}
			}
		}
		if egress {
			r.EgressIsolated = true
			for _, rule := range p.Spec.Egress {
				out = append(out, c.egressAtoms(p.Namespace, rule)...)
			}
		}
	}
	if !r.IngressIsolated && c.IsolateNamespaces && c.Range.IsValid() {
		r.IngressIsolated = true
		in = c.ownNamespace(sb.Namespace)
	}
	var t1, t2 bool
	if r.IngressIsolated {
		r.Ingress, t1 = flatten(in)
	}
	if r.EgressIsolated {
		r.Egress, t2 = flatten(out)
	}
	r.Truncated = t1 || t2
	return r
}

// ownNamespace allows everything from outside the cluster's range and
// from the sandboxes of namespace ns.
func (c *Cluster) ownNamespace(ns string) []atom {
	out := []atom{{cidr: everywhere, except: []netip.Prefix{c.Range.Masked()}, ports: []PortRange{anyPort}}}
	for _, s := range c.Sandboxes {
		if s.Namespace == ns && s.IP.IsValid() && s.IP.Is4() {
			out = append(out, atom{cidr: netip.PrefixFrom(s.IP, 32), ports: []PortRange{anyPort}})
		}
	}
	return out
}

// directions are the policy types, defaulted as Kubernetes does.
func directions(s *v1alpha1.NetworkPolicySpec) (ingress, egress bool) {
	if len(s.PolicyTypes) == 0 {
		return true, len(s.Egress) > 0
	}
	return slices.Contains(s.PolicyTypes, v1alpha1.PolicyIngress), slices.Contains(s.PolicyTypes, v1alpha1.PolicyEgress)
}

func matches(sel *metav1.LabelSelector, l map[string]string) bool {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false // an invalid selector selects nothing
	}
	return s.Matches(labels.Set(l))
}

// peers are the address sets of a rule's peers (everywhere if none);
// named ports of egress rules are resolved per sandbox by egressAtoms.
func (c *Cluster) peers(ns string, peers []v1alpha1.NetworkPolicyPeer) []atom {
	if len(peers) == 0 {
		return []atom{{cidr: everywhere}}
	}
	var out []atom
	for _, peer := range peers {
		if peer.IPBlock != nil {
			if a, ok := ipBlock(peer.IPBlock); ok {
				out = append(out, a)
			}
			continue
		}
		for _, s := range c.selected(ns, peer) {
			out = append(out, atom{cidr: netip.PrefixFrom(s.IP, 32)})
		}
	}
	return out
}

func (c *Cluster) egressAtoms(ns string, rule v1alpha1.NetworkPolicyEgressRule) []atom {
	if len(rule.To) == 0 {
		return []atom{{cidr: everywhere, ports: resolvePorts(rule.Ports, Sandbox{})}}
	}
	var out []atom
	for _, peer := range rule.To {
		if peer.IPBlock != nil {
			if a, ok := ipBlock(peer.IPBlock); ok {
				a.ports = resolvePorts(rule.Ports, Sandbox{})
				out = append(out, a)
			}
			continue
		}
		for _, s := range c.selected(ns, peer) {
			out = append(out, atom{cidr: netip.PrefixFrom(s.IP, 32), ports: resolvePorts(rule.Ports, s)})
		}
	}
	return out
}

// selected are the sandboxes (with addresses) a selector peer picks.
func (c *Cluster) selected(ns string, peer v1alpha1.NetworkPolicyPeer) []Sandbox {
	var out []Sandbox
	for _, s := range c.Sandboxes {
		if !s.IP.IsValid() || !s.IP.Is4() {
			continue
		}
		if peer.NamespaceSelector != nil {
			l := map[string]string{"kubernetes.io/metadata.name": s.Namespace}
			for k, v := range c.Namespaces[s.Namespace] {
				l[k] = v
			}
			if !matches(peer.NamespaceSelector, l) {
				continue
			}
		} else if s.Namespace != ns {
			continue
		}
		if peer.SandboxSelector != nil && !matches(peer.SandboxSelector, s.Labels) {
			continue
		}
		out = append(out, s)
	}
	return out
}

func ipBlock(b *v1alpha1.IPBlock) (atom, bool) {
	p, err := netip.ParsePrefix(b.CIDR)
	if err != nil || !p.Addr().Is4() {
		return atom{}, false
	}
	a := atom{cidr: p.Masked()}
	for _, e := range b.Except {
		if ep, err := netip.ParsePrefix(e); err == nil && ep.Addr().Is4() {
			a.except = append(a.except, ep.Masked())
		}
	}
	return a, true
}

// resolvePorts turns a rule's ports into ranges; named ports are looked
// up in dst, the sandbox the traffic goes to (unknown names allow nothing).
func resolvePorts(ports []v1alpha1.NetworkPolicyPort, dst Sandbox) []PortRange {
	if len(ports) == 0 {
		return []PortRange{anyPort}
	}
	var out []PortRange
	for _, p := range ports {
		proto := v1alpha1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		num := uint8(ProtoTCP)
		switch proto {
		case v1alpha1.ProtocolUDP:
			num = ProtoUDP
		case v1alpha1.ProtocolICMP:
			out = append(out, PortRange{Proto: ProtoICMP, Lo: 0, Hi: 65535})
			continue
		}
		switch {
		case p.Port == nil:
			out = append(out, PortRange{Proto: num, Lo: 0, Hi: 65535})
		case p.Port.Type == intstr.Int:
			hi := p.Port.IntVal
			if p.EndPort != nil && *p.EndPort >= hi {
				hi = *p.EndPort
			}
			out = append(out, PortRange{Proto: num, Lo: uint16(p.Port.IntVal), Hi: uint16(hi)})
		default:
			for _, sp := range dst.Ports {
				spProto := sp.Protocol
				if spProto == "" {
					spProto = v1alpha1.ProtocolTCP
				}
				if sp.Name == p.Port.StrVal && spProto == proto {
					out = append(out, PortRange{Proto: num, Lo: uint16(sp.Port), Hi: uint16(sp.Port)})
				}
			}
		}
	}
	if out == nil {
		out = []PortRange{} // nothing resolved: the peer gets nothing
	}
	return out
}

// flatten turns atoms into longest-prefix rules: each prefix that any atom
// names (as its CIDR or an except) carries the union of the ports of the
// atoms that hold all of it. For any address, the atoms that hold it are
// exactly those that hold the longest named prefix holding it (an atom's
// CIDR and excepts are all named), so one lookup answers "does any rule
// allow this".
func flatten(atoms []atom) (Rules, bool) {
	prefixes := map[netip.Prefix]bool{}
	for _, a := range atoms {
		prefixes[a.cidr] = true
		for _, e := range a.except {
			if covers(a.cidr, e) {
				prefixes[e] = true
			}
		}
	}
	out := Rules{}
	truncated := false
	for p := range prefixes {
		var ports []PortRange
		for _, a := range atoms {
			if !covers(a.cidr, p) || slices.ContainsFunc(a.except, func(e netip.Prefix) bool { return covers(e, p) }) {
				continue
			}
			ports = append(ports, a.ports...)
		}
		var t bool
		out[p], t = merge(ports)
		truncated = truncated || t
	}
	return out, truncated
}

// covers reports whether a holds all of b.
func covers(a, b netip.Prefix) bool { return a.Bits() <= b.Bits() && a.Contains(b.Addr()) }

// merge unions port ranges: any protocol swallows the rest; overlapping
// or adjacent ranges of one protocol join.
func merge(in []PortRange) ([]PortRange, bool) {
	if slices.Contains(in, anyPort) {
		return []PortRange{anyPort}, false
	}
	sort.Slice(in, func(i, j int) bool {
		if in[i].Proto != in[j].Proto {
			return in[i].Proto < in[j].Proto
		}
		return in[i].Lo < in[j].Lo
	})
	out := []PortRange{}
	for _, r := range in {
		if n := len(out); n > 0 && out[n-1].Proto == r.Proto && int(r.Lo) <= int(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	if len(out) > MaxPorts {
		return out[:MaxPorts], true
	}
	return out, false
}
