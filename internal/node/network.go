package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/network"
	"hearth.dev/hearth/internal/network/ipam"
	"hearth.dev/hearth/internal/network/policy"
)

// tapPrefix starts the name of every sandbox tap ("hs" + 12 hex digits of
// the sandbox's UID: 14 bytes, under IFNAMSIZ).
const tapPrefix = "hs"

// tapFile, in a sandbox's directory, names its tap: a warm pool's sandbox
// taken over by a claim keeps its VM's tap under the claim's name.
const tapFile = "tap"

// hostNetwork is the node agent's side of the sandboxes' network: the
// host's routes and NAT, address leases, the policy programs and DNS. It
// watches every Sandbox, NetworkPolicy, Namespace and Host in the cluster
// (policies select peers anywhere) through a cache of its own.
type hostNetwork struct {
	a       *Agent
	cluster netip.Prefix
	enabled bool
	// isolate is the cluster's namespace isolation (policy.Cluster).
	isolate bool
	all     cache.Cache
	host    *network.Host
	pool    *ipam.Pool
	dp      *policy.Datapath
	ready   chan struct{}
	// resync asks for the policies to be applied again, hostsChanged for
	// the routes and forbidden addresses.
	resync, hostsChanged chan struct{}

	mu  sync.Mutex
	eps map[types.UID]endpoint
	// live are the cluster's sandbox addresses at the last policy sync:
	// flows with one gone are forgotten (policy.Datapath.Forget).
	live map[netip.Addr]bool
}

type endpoint struct {
	ifindex   int
	addr      netip.Addr
	tap       string
	namespace string
	nat       bool
}

func newHostNetwork(a *Agent, all cache.Cache, cluster netip.Prefix, enabled, isolate bool) *hostNetwork {
	return &hostNetwork{a: a, cluster: cluster, all: all, enabled: enabled, isolate: isolate, ready: make(chan struct{}), resync: make(chan struct{}, 1), hostsChanged: make(chan struct{}, 1),
		eps: map[types.UID]endpoint{}}
}

func (n *hostNetwork) isReady() bool {
	select {
	case <-n.ready:
		return true
	default:
		return false
	}
}

// kick wakes the sync loop for ch, once however often it is called.
func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// run waits for the host's range, sets the host up, then keeps routes,
// special addresses and policies in line with the cluster.
func (n *hostNetwork) run(ctx context.Context) error {
	if !n.enabled {
		return nil
	}
	cidr, err := n.waitRange(ctx)
	if err != nil {
		return err
	}
	// The cluster's range decides what namespace isolation and no-NAT
	// sandboxes hold to: a node started with another than the control
	// plane's would enforce neither as the cluster means.
	if !n.cluster.Contains(cidr.Addr()) || cidr.Bits() < n.cluster.Bits() {
		return fmt.Errorf("this host's sandbox range %s is outside the cluster's %s that this node was started with: give it the control plane's --sandbox-cidr", cidr, n.cluster)
	}
	n.host = &network.Host{CIDR: cidr, Cluster: n.cluster}
	if err := n.host.Setup(); err != nil {
		return fmt.Errorf("set up the host network: %w", err)
	}
	pins := PinDir(n.a.cfg.Name, n.a.cfg.StateDir)
	if err := network.EnsureBPFFS(filepath.Dir(filepath.Dir(pins))); err != nil {
		// Without pins the programs leave the taps with this process.
		n.a.log.Warn("policy programs will not outlive the node agent", "err", err)
		pins = ""
	}
	if n.dp, err = policy.Load(pins); err != nil {
		return err
	}
	defer n.dp.Close()
	if err := n.dp.SetNetwork(n.host.Gateway(), n.cluster); err != nil {
		return err
	}
	n.pool = ipam.NewPool(cidr)
	var mine v1alpha1.SandboxList
	if err := n.a.client.List(ctx, &mine); err != nil {
		return err
	}
	for _, sb := range mine.Items {
		if a, err := netip.ParseAddr(sb.Status.IP); err == nil && !sb.Status.Phase.Terminal() {
			if err := n.pool.Reserve(a, string(sb.UID)); err != nil {
				n.a.log.Warn("sandbox address", "sandbox", sb.Namespace+"/"+sb.Name, "err", err)
			}
		}
	}
	// Hosts decide the routes and the forbidden addresses; sandboxes,
	// policies and namespaces the policies.
	for obj, ch := range map[client.Object]chan struct{}{&v1alpha1.Sandbox{}: n.resync, &v1alpha1.NetworkPolicy{}: n.resync,
		&corev1.Namespace{}: n.resync, &v1alpha1.Host{}: n.hostsChanged} {
		inf, err := n.all.GetInformer(ctx, obj)
		if err != nil {
			return err
		}
		if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { kick(ch) },
			UpdateFunc: func(any, any) { kick(ch) },
			DeleteFunc: func(any) { kick(ch) },
		}); err != nil {
			return err
		}
	}
	dnsErr := make(chan error, 1)
	d := &network.DNS{Addr: net.JoinHostPort(n.host.Gateway().String(), "53"), Lookup: n.lookup, Client: n.dnsClient,
		Upstreams: network.Upstreams("/etc/resolv.conf", n.host.Gateway()), Log: n.a.log}
	go func() { dnsErr <- d.Serve(ctx) }()
	close(n.ready)
	n.a.log.Info("sandbox network ready", "range", cidr, "gateway", n.host.Gateway())
	// Sandboxes waiting for the network start now.
	n.a.requeueAll(ctx)
	hosts, policies := true, true
	for {
		// A sync that failed (the API out of reach, a map write refused)
		// is tried again in 2 seconds rather than 30: what it would have
		// forbidden is not in force until it succeeds.
		next := 30 * time.Second
		if hosts {
			if err := n.syncHosts(ctx); err != nil && ctx.Err() == nil {
				n.a.log.Warn("network sync: hosts", "err", err)
				next = 2 * time.Second
			}
		}
		if policies {
			if err := n.syncPolicies(ctx); err != nil && ctx.Err() == nil {
				n.a.log.Warn("network sync: policies", "err", err)
				next = 2 * time.Second
			}
		}
		hosts, policies = false, false
		select {
		case <-ctx.Done():
			return nil
		case err := <-dnsErr:
			if ctx.Err() == nil {
				return fmt.Errorf("DNS server: %w", err)
			}
			return nil
		case <-n.hostsChanged:
			hosts = true
		case <-n.resync:
			policies = true
		case <-time.After(next):
			// This host's own interfaces may have changed too.
			hosts, policies = true, true
		}
	}
}

// PinDir is where a node agent pins its policy maps and links: under
// /sys/fs/bpf/hearth, by host name and state directory, so that agents of
// several hosts on one machine (the tests') keep apart.
func PinDir(name, stateDir string) string {
	sum := sha256.Sum256([]byte(stateDir))
	return filepath.Join("/sys/fs/bpf/hearth", name+"-"+hex.EncodeToString(sum[:4]))
}

// waitRange waits for the control plane to give the host its range.
func (n *hostNetwork) waitRange(ctx context.Context) (netip.Prefix, error) {
	logged := false
	for {
		var h v1alpha1.Host
		if err := n.a.reader.Get(ctx, types.NamespacedName{Name: n.a.cfg.Name}, &h); err == nil && h.Spec.SandboxCIDR != "" {
			return netip.ParsePrefix(h.Spec.SandboxCIDR)
		}
		if !logged {
			n.a.log.Info("waiting for the control plane to give this host a sandbox range")
			logged = true
		}
		select {
		case <-ctx.Done():
			return netip.Prefix{}, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// syncHosts brings the routes to the other hosts and the addresses no
// sandbox may reach in line with the cluster's hosts and this host's
// interfaces.
func (n *hostNetwork) syncHosts(ctx context.Context) error {
	var hosts v1alpha1.HostList
	if err := n.all.List(ctx, &hosts); err != nil {
		return err
	}
	special := map[netip.Prefix]uint32{}
	for _, p := range network.Unreachable(n.cluster, hosts.Items) {
		special[p] = policy.Forbidden
	}
	for i := range hosts.Items {
		// Every host's address: forbidden to sandboxes, trusted as a source.
		if via, ok := network.HostAddr(&hosts.Items[i]); ok {
			special[netip.PrefixFrom(via, 32)] = policy.Forbidden | policy.Trusted
		}
	}
	addrs, nets, err := network.LocalPrefixes()
	if err != nil {
		return err
	}
	for _, p := range append(addrs, nets...) {
		if p.Addr() != n.host.Gateway() {
			special[p] = policy.Forbidden | policy.Trusted
		}
	}
	if cp, ok := n.a.controlPlaneAddr(); ok {
		special[netip.PrefixFrom(cp, 32)] = policy.Forbidden | policy.Trusted
	}
	return errors.Join(network.SyncPeers(network.HostRoutes(hosts.Items, n.a.cfg.Name)), n.dp.SetSpecial(special))
}

// syncPolicies compiles and applies the policy of each local sandbox.
func (n *hostNetwork) syncPolicies(ctx context.Context) error {
	var pols v1alpha1.NetworkPolicyList
	var sbs v1alpha1.SandboxList
	var nss corev1.NamespaceList
	for _, l := range []client.ObjectList{&pols, &sbs, &nss} {
		if err := n.all.List(ctx, l); err != nil {
			return err
		}
	}
	c := &policy.Cluster{Policies: pols.Items, Namespaces: map[string]map[string]string{}, IsolateNamespaces: n.isolate, Range: n.cluster}
	byUID := map[types.UID]policy.Sandbox{}
	live := map[netip.Addr]bool{}
	for _, ns := range nss.Items {
		c.Namespaces[ns.Name] = ns.Labels
	}
	for _, sb := range sbs.Items {
		s := policy.Sandbox{Namespace: sb.Namespace, Name: sb.Name, Labels: sb.Labels, Ports: sb.Spec.Ports}
		byUID[sb.UID] = s
		if a, err := netip.ParseAddr(sb.Status.IP); err == nil && !sb.Status.Phase.Terminal() {
			s.IP = a
			c.Sandboxes = append(c.Sandboxes, s)
			live[a] = true
		}
	}
	n.mu.Lock()
	eps := make(map[types.UID]endpoint, len(n.eps))
	for k, v := range n.eps {
		eps[k] = v
		live[v.addr] = true
	}
	n.mu.Unlock()
	var errs []error
	// Sandboxes gone elsewhere: their addresses go to other tenants after
	// ipam.Quarantine, with none of the flows local sandboxes had with
	// them. On the first sync since this agent started, every flow with a
	// sandbox address that no sandbox has now goes: it may have gone
	// while the agent was down (the pinned tables outlive the agent).
	if prev := n.live; prev == nil {
		errs = append(errs, n.dp.Forget(func(a netip.Addr) bool { return n.cluster.Contains(a) && !live[a] }))
	} else {
		gone := map[netip.Addr]bool{}
		for a := range prev {
			if !live[a] {
				gone[a] = true
			}
		}
		if len(gone) > 0 {
			errs = append(errs, n.dp.Forget(func(a netip.Addr) bool { return gone[a] }))
		}
	}
	n.live = live
	for uid, ep := range eps {
		// A sandbox not in this cache yet is selected by no policy until
		// the next sync, which its arrival in the cache triggers.
		s := byUID[uid]
		s.IP = ep.addr
		r := policy.Compile(c, s)
		if r.Truncated {
			n.a.log.Warn("a sandbox's policy has more port ranges per peer than the data path holds; the rest are denied",
				"sandbox", s.Namespace+"/"+s.Name, "max", policy.MaxPorts)
		}
		errs = append(errs, n.dp.SetPolicy(ep.ifindex, r))
	}
	return errors.Join(errs...)
}

// dnsClient tells the DNS server which local sandbox asks.
func (n *hostNetwork) dnsClient(src netip.Addr) (network.Client, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, ep := range n.eps {
		if ep.addr == src {
			return network.Client{Namespace: ep.namespace, Forward: ep.nat}, true
		}
	}
	return network.Client{}, false
}

// lookup resolves NAME.NAMESPACE.hearth for the DNS server.
func (n *hostNetwork) lookup(name, namespace string) (netip.Addr, bool) {
	var sb v1alpha1.Sandbox
	if err := n.all.Get(context.Background(), types.NamespacedName{Namespace: namespace, Name: name}, &sb); err != nil {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(sb.Status.IP)
	return a, err == nil && !sb.Status.Phase.Terminal()
}

// lease gives the sandbox an address if it has none. It reports whether
// status.ip changed: the caller writes the status before it starts the
// VM, so that a restarted agent knows every address it leased.
func (n *hostNetwork) lease(sb *v1alpha1.Sandbox) (changed bool, err error) {
	owner := string(sb.UID)
	if a, err := netip.ParseAddr(sb.Status.IP); err == nil && n.host.CIDR.Contains(a) {
		return false, n.pool.Reserve(a, owner)
	}
	a, err := n.pool.Allocate(owner)
	if err != nil {
		return false, err
	}
	sb.Status.IP = a.String()
	return true, nil
}

// attach makes the sandbox's tap, routes its address there and puts the
// policy programs on it; it returns what the VM needs.
func (n *hostNetwork) attach(sb *v1alpha1.Sandbox, dir string) (tap string, cfg *protocol.Network, err error) {
	addr, err := netip.ParseAddr(sb.Status.IP)
	if err != nil {
		return "", nil, fmt.Errorf("sandbox %s has no address", sb.Name)
	}
	tap = readTap(dir)
	if tap == "" {
		tap = tapPrefix + strings.ReplaceAll(string(sb.UID), "-", "")[:12]
		if err := os.WriteFile(filepath.Join(dir, tapFile), []byte(tap), 0o600); err != nil {
			return "", nil, err
		}
	}
	ifindex, err := n.host.AddTap(tap, addr)
	if err != nil {
		return "", nil, err
	}
	if err := n.dp.Attach(ifindex, addr, sb.Spec.Network.NATEnabled()); err != nil {
		return "", nil, err
	}
	n.mu.Lock()
	n.eps[sb.UID] = endpoint{ifindex: ifindex, addr: addr, tap: tap, namespace: sb.Namespace, nat: sb.Spec.Network.NATEnabled()}
	n.mu.Unlock()
	kick(n.resync)
	gw := n.host.Gateway().String()
	return tap, &protocol.Network{Address: addr.String() + "/32", Gateway: gw, DNS: []string{gw},
		Search: []string{sb.Namespace + "." + strings.TrimSuffix(network.Zone, ".")}}, nil
}

// adopted re-attaches a running sandbox's tap after an agent restart or a
// warm pool claim (whose tap keeps its member's name).
func (n *hostNetwork) adopted(sb *v1alpha1.Sandbox, dir string) error {
	if !n.isReady() || readTap(dir) == "" || sb.Status.IP == "" {
		return nil
	}
	n.mu.Lock()
	ep, ok := n.eps[sb.UID]
	n.mu.Unlock()
	if ok && ep.addr.String() == sb.Status.IP {
		return nil
	}
	if _, err := n.lease(sb); err != nil {
		return err
	}
	_, _, err := n.attach(sb, dir)
	return err
}

// transfer gives a warm pool member's address and tap to the claim that
// took its VM over.
func (n *hostNetwork) transfer(from, to types.UID, addr string) error {
	if !n.isReady() {
		return nil
	}
	n.pool.Release(string(from))
	if a, err := netip.ParseAddr(addr); err == nil {
		if err := n.pool.Reserve(a, string(to)); err != nil {
			return err
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if ep, ok := n.eps[from]; ok {
		n.eps[to] = ep
		delete(n.eps, from)
	}
	return nil
}

// release takes the programs off the sandbox's tap, removes it and frees
// its address.
func (n *hostNetwork) release(uid types.UID, dir string) error {
	if !n.isReady() {
		return nil
	}
	n.mu.Lock()
	ep, ok := n.eps[uid]
	delete(n.eps, uid)
	n.mu.Unlock()
	var errs []error
	if ok {
		errs = append(errs, n.dp.Detach(ep.ifindex))
	}
	if tap := readTap(dir); tap != "" {
		errs = append(errs, network.DelTap(tap))
	}
	n.pool.Release(string(uid))
	return errors.Join(errs...)
}

// collectTaps removes sandbox taps that no sandbox directory names.
func (n *hostNetwork) collectTaps(stateDir string) error {
	if !n.isReady() {
		return nil
	}
	taps, err := network.Taps(tapPrefix)
	if err != nil {
		return err
	}
	used := map[string]bool{}
	entries, _ := os.ReadDir(stateDir)
	for _, e := range entries {
		if t := readTap(filepath.Join(stateDir, e.Name())); t != "" {
			used[t] = true
		}
	}
	var errs []error
	for _, t := range taps {
		if !used[t] {
			errs = append(errs, network.DelTap(t))
		}
	}
	return errors.Join(errs...)
}

func readTap(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, tapFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// clusterAddrs are the addresses of the cluster's hosts and its control
// plane, which a tenant's registry may not be at: a name that resolves to
// one would make this node a client of another host's services.
func (n *hostNetwork) clusterAddrs(ctx context.Context) []netip.Addr {
	var out []netip.Addr
	if cp, ok := n.a.controlPlaneAddr(); ok {
		out = append(out, cp)
	}
	var hosts v1alpha1.HostList
	if err := n.all.List(ctx, &hosts); err != nil {
		n.a.log.Warn("hosts' addresses for the registry guard", "err", err)
		return out
	}
	for i := range hosts.Items {
		if addr, ok := network.HostAddr(&hosts.Items[i]); ok {
			out = append(out, addr)
		}
	}
	return out
}
