// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// hearth's network policy data path: two tcx programs on each sandbox's tap
// device. tcx ingress on the tap sees what the sandbox sends (its egress);
// tcx egress on the tap sees what is delivered to it (its ingress).
//
// Order of checks for a packet the sandbox sends (sandbox_egress):
//   anti-spoofing (source must be the sandbox's address) → an established
//   flow (conntrack) passes → the gateway only for ICMP and DNS →
//   forbidden destinations (host addresses, management network, control
//   plane, 169.254.0.0/16) drop whatever the policies say → without NAT no
//   destination outside the cluster → egress rules if isolated → a new
//   conntrack entry.
// For a packet delivered to the sandbox (sandbox_ingress):
//   established flow → from the hosts' infrastructure (ingress, probes)
//   passes → ingress rules if isolated → a new conntrack entry.
//
// Each sandbox has a connection table of its own (conntrack, a map of
// maps by tap): one that opens flows without end evicts only its own.
//
// The maps are pinned by name (the node agent's pin directory) and so are
// the links that attach the programs: a node agent that restarts finds the
// state it left and the programs still enforcing it in the meantime.
//
// Rules are longest-prefix-match tries keyed by (sandbox address, peer
// address): userspace (compile.go) flattens a sandbox's policies so that
// the longest matching prefix carries the union of every rule that covers
// it, which gives Kubernetes' "any rule allows" semantics with ipBlock
// excepts in one lookup.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TCX_NEXT -1
#define TCX_PASS 0
#define TCX_DROP 2

#define MAX_PORTS 16

#define EP_INGRESS_ISOLATED 1
#define EP_EGRESS_ISOLATED 2
#define EP_NO_NAT 4

#define FLAG_FORBIDDEN 1 // a sandbox never sends to it
#define FLAG_TRUSTED 2   // the hosts' own: may open connections to sandboxes

#define DIR_EGRESS 0
#define DIR_INGRESS 1

// Entries of one sandbox's connection table: a flow takes two (its
// packets and its replies).
#define CT_ENTRIES 8192

#define CT_TIMEOUT_TCP (3600ULL * 1000000000ULL)
#define CT_TIMEOUT_OTHER (120ULL * 1000000000ULL)

struct endpoint {
	__u32 addr; // network byte order
	__u32 flags;
};

struct config {
	__u32 gateway;      // network byte order
	__u32 cluster_net;  // network byte order
	__u32 cluster_mask; // network byte order
};

struct rule_key {
	__u32 prefixlen; // 32 + the peer's prefix length
	__u32 ep;        // the sandbox's address
	__u32 peer;      // the peer's address
};

struct port_range {
	__u8 proto; // 0: every protocol
	__u8 pad;
	__u16 lo, hi; // host byte order; 0-65535 for every port
};

struct rule {
	__u32 n;
	struct port_range r[MAX_PORTS];
};

struct addr_key {
	__u32 prefixlen;
	__u32 addr;
};

struct ct_key {
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto, dir;
	__u16 pad;
};

struct ct_entry {
	__u64 seen;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32); // ifindex
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 18);
	__type(key, struct rule_key);
	__type(value, struct rule);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} egress_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 18);
	__type(key, struct rule_key);
	__type(value, struct rule);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ingress_rules SEC(".maps");

// Addresses sandboxes may not reach, or whose packets are trusted: about
// five per host of the cluster (its address; its range's network, gateway
// and broadcast) and this host's own, so 65,536 leave room for ~10,000
// hosts. Userspace refuses a set larger than this (SpecialEntries).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 16);
	__type(key, struct addr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} special SEC(".maps");

// Connection tracking is a table per sandbox (by tap ifindex), made by
// userspace when it attaches the programs: a sandbox that opens flows
// without end evicts its own entries only (an LRU hash), never another
// tenant's, and a tap's table goes with it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4096);
	__type(key, __u32); // ifindex
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	// Sizes, not types: a type named this deep reaches BTF as a forward
	// declaration (clang prunes what only pointers reach), which loaders
	// cannot size. Inline: a named struct only pointed to here would too.
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_LRU_HASH);
		__uint(max_entries, CT_ENTRIES);
		__uint(key_size, sizeof(struct ct_key));
		__uint(value_size, sizeof(struct ct_entry));
	});
} conntrack SEC(".maps");

struct pkt {
	__u32 saddr, daddr;
	__u16 sport, dport; // host byte order
	__u8 proto;
};

// parse fills p for an IPv4 packet; 1: ARP (passes), 0: IPv4, -1: other.
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p) {
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return -1;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = 0;
	p->dport = 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0; // a later fragment: no ports
	void *l4 = (void *)ip + ip->ihl * 4;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__u16 *ports = l4;
		if ((void *)(ports + 2) > end)
			return -1;
		p->sport = bpf_ntohs(ports[0]);
		p->dport = bpf_ntohs(ports[1]);
	} else if (p->proto == IPPROTO_ICMP) {
		__u8 *icmp = l4;
		if ((void *)(icmp + 8) > end)
			return -1;
		// Echo request (8) and reply (0): the identifier is the flow.
		if (icmp[0] == 8 || icmp[0] == 0) {
			__u16 id = bpf_ntohs(*(__u16 *)(icmp + 4));
			p->sport = id;
			p->dport = id;
		}
	}
	return 0;
}

static __always_inline int ct_established(void *table, struct pkt *p, __u8 dir) {
	struct ct_key k = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport, .proto = p->proto, .dir = dir};
	struct ct_entry *e = bpf_map_lookup_elem(table, &k);
	if (!e)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 timeout = p->proto == IPPROTO_TCP ? CT_TIMEOUT_TCP : CT_TIMEOUT_OTHER;
	if (now - e->seen > timeout)
		return 0;
	if (now - e->seen > 1000000000ULL)
		e->seen = now;
	return 1;
}

// ct_open records the flow at this point (dir) and its replies at the same
// point, in the other direction.
static __always_inline void ct_open(void *table, struct pkt *p, __u8 dir) {
	struct ct_entry e = {.seen = bpf_ktime_get_ns()};
	struct ct_key k = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport, .proto = p->proto, .dir = dir};
	bpf_map_update_elem(table, &k, &e, BPF_ANY);
	struct ct_key r = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport, .proto = p->proto, .dir = dir ^ 1};
	bpf_map_update_elem(table, &r, &e, BPF_ANY);
}

static __always_inline int allowed(void *rules, __u32 ep, __u32 peer, struct pkt *p) {
	struct rule_key k = {.prefixlen = 64, .ep = ep, .peer = peer};
	struct rule *r = bpf_map_lookup_elem(rules, &k);
	if (!r)
		return 0;
	__u32 n = r->n;
	// A bounded loop: the verifier walks it (kernels >= 5.3).
	for (int i = 0; i < MAX_PORTS; i++) {
		if (i >= n)
			break;
		struct port_range *pr = &r->r[i];
		if (pr->proto != 0 && pr->proto != p->proto)
			continue;
		if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
			return 1; // ports only narrow TCP and UDP
		if (p->dport >= pr->lo && p->dport <= pr->hi)
			return 1;
	}
	return 0;
}

static __always_inline __u32 special_flags(__u32 addr) {
	struct addr_key k = {.prefixlen = 32, .addr = addr};
	__u32 *f = bpf_map_lookup_elem(&special, &k);
	return f ? *f : 0;
}

SEC("tcx/ingress")
int sandbox_egress(struct __sk_buff *skb) {
	__u32 ifindex = skb->ifindex;
	struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (!ep)
		return TCX_DROP;
	struct pkt p;
	int kind = parse(skb, &p);
	if (kind == 1)
		return TCX_PASS;
	if (kind < 0 || p.saddr != ep->addr)
		return TCX_DROP;
	void *ct = bpf_map_lookup_elem(&conntrack, &ifindex);
	if (!ct)
		return TCX_DROP;
	if (ct_established(ct, &p, DIR_EGRESS))
		return TCX_PASS;
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&settings, &zero);
	if (!cfg)
		return TCX_DROP;
	if (p.daddr == cfg->gateway) {
		if (p.proto == IPPROTO_ICMP || ((p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP) && p.dport == 53))
			return TCX_PASS;
		return TCX_DROP;
	}
	if (special_flags(p.daddr) & FLAG_FORBIDDEN)
		return TCX_DROP;
	if ((ep->flags & EP_NO_NAT) && (p.daddr & cfg->cluster_mask) != cfg->cluster_net)
		return TCX_DROP;
	if ((ep->flags & EP_EGRESS_ISOLATED) && !allowed(&egress_rules, ep->addr, p.daddr, &p))
		return TCX_DROP;
	ct_open(ct, &p, DIR_EGRESS);
	return TCX_PASS;
}

SEC("tcx/egress")
int sandbox_ingress(struct __sk_buff *skb) {
	__u32 ifindex = skb->ifindex;
	struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (!ep)
		return TCX_DROP;
	struct pkt p;
	int kind = parse(skb, &p);
	if (kind == 1)
		return TCX_PASS;
	if (kind < 0)
		return TCX_DROP;
	void *ct = bpf_map_lookup_elem(&conntrack, &ifindex);
	if (!ct)
		return TCX_DROP;
	if (ct_established(ct, &p, DIR_INGRESS))
		return TCX_PASS;
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&settings, &zero);
	if (!cfg)
		return TCX_DROP;
	if (p.saddr == cfg->gateway || (special_flags(p.saddr) & FLAG_TRUSTED)) {
		ct_open(ct, &p, DIR_INGRESS);
		return TCX_PASS;
	}
	if ((ep->flags & EP_INGRESS_ISOLATED) && !allowed(&ingress_rules, ep->addr, p.saddr, &p))
		return TCX_DROP;
	ct_open(ct, &p, DIR_INGRESS);
	return TCX_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
