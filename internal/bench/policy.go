package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network/nettest"
	"hearth.dev/hearth/internal/network/policy"
)

// PolicyOptions configure `hearth bench policy`.
type PolicyOptions struct {
	Rules    int
	Duration time.Duration // per measurement and round
	Rounds   int
	Out      io.Writer
	Log      *slog.Logger
}

// PolicyResult is the benchmark's outcome.
type PolicyResult struct {
	Rounds int `json:"rounds"`
	Rules  int `json:"rules"`
	// Bulk TCP throughput from one sandbox namespace to another through
	// the host namespace, and the p99 of a one-byte request/response.
	// Medians over the rounds.
	BaseMBps    float64 `json:"base_mbps"`
	PolicyMBps  float64 `json:"policy_mbps"`
	BaseP99us   float64 `json:"base_p99_us"`
	PolicyP99us float64 `json:"policy_p99_us"`
	// Throughput with the programs over without, the median of the
	// rounds' (target ≥ 0.95).
	Ratio float64 `json:"ratio"`
}

// Summary is the result in the benchmarks' common shape. The main ratio
// is the median of the rounds' ratios, not the ratio of the medians.
func (r *PolicyResult) Summary() *Result {
	f := NewFigure("mbps", r.PolicyMBps, "no_programs_mbps", r.BaseMBps, Higher, 0.95)
	f.Ratio = r.Ratio
	met := f.Ratio >= f.Target
	f.Met = &met
	return &Result{Bench: "policy", N: r.Rounds, Details: r, Figure: f,
		More: []Figure{NewFigure("p99_us", r.PolicyP99us, "no_programs_p99_us", r.BaseP99us, Lower, 0)}}
}

// Policy measures the policy data path: two sandbox namespaces routed
// through a host namespace (as the node agent sets a host up, veths in
// the place of taps), without programs and with the tcx programs holding
// o.Rules rules for each side's policy, in alternating rounds.
func Policy(ctx context.Context, o PolicyOptions) (*PolicyResult, error) {
	var res *PolicyResult
	err := nettest.Run(func(s *nettest.Scope) error {
		r := nettest.NewRouted(s, 2, netip.MustParsePrefix("10.252.1.0/24"), netip.MustParsePrefix("10.252.0.0/16"))
		a, b := r.Sandboxes[0], r.Sandboxes[1]
		srv := net.JoinHostPort(b.Addr.String(), "5001")
		ln, err := nettest.Listen(b.NS, "tcp", srv)
		if err != nil {
			return err
		}
		s.Cleanup(func() { ln.Close() })
		go serveBench(ln)

		var dp *policy.Datapath
		if err := nettest.Do(r.Host, func() error {
			var err error
			dp, err = policy.Load("")
			return err
		}); err != nil {
			return err
		}
		s.Cleanup(func() { _ = dp.Close() })
		cluster := policyCluster(o.Rules, a.Addr, b.Addr)
		on := func() error {
			return nettest.Do(r.Host, func() error {
				errs := []error{dp.SetNetwork(r.Net.Gateway(), r.Net.Cluster)}
				for i, sb := range r.Sandboxes {
					errs = append(errs, dp.Attach(sb.Ifindex, sb.Addr, true), dp.SetPolicy(sb.Ifindex, policy.Compile(cluster, cluster.Sandboxes[i])))
				}
				return errors.Join(errs...)
			})
		}
		off := func() error {
			return nettest.Do(r.Host, func() error { return errors.Join(dp.Detach(a.Ifindex), dp.Detach(b.Ifindex)) })
		}
		var base, pol []float64
		var baseLat, polLat []time.Duration
		for round := 0; round < o.Rounds; round++ {
			// ABBA: which goes first alternates, so that a drift within a
			// round does not favour either.
			order := []bool{false, true}
			if round%2 == 1 {
				order = []bool{true, false}
			}
			for _, withPolicy := range order {
				if err := map[bool]func() error{false: off, true: on}[withPolicy](); err != nil {
					return err
				}
				mbps, err := bulk(ctx, a.NS, srv, o.Duration)
				if err != nil {
					return err
				}
				lat, err := pingPong(ctx, a.NS, srv, o.Duration/2)
				if err != nil {
					return err
				}
				name := "no programs"
				if withPolicy {
					name = fmt.Sprintf("%d rules", o.Rules)
					pol, polLat = append(pol, mbps), append(polLat, lat...)
				} else {
					base, baseLat = append(base, mbps), append(baseLat, lat...)
				}
				fmt.Fprintf(o.Out, "round %d %-12s %8.1f MB/s  p99 %.0f µs\n", round+1, name, mbps, pctMs(lat, 99)*1000)
			}
		}
		// Each round's pair ran back to back: the median of their ratios
		// holds up better against this machine's swings than a ratio of
		// means.
		ratios := make([]float64, len(base))
		for i := range base {
			ratios[i] = pol[i] / base[i]
		}
		res = &PolicyResult{Rounds: o.Rounds, Rules: o.Rules, BaseMBps: round(median(base), 1), PolicyMBps: round(median(pol), 1),
			BaseP99us: round(pctMs(baseLat, 99)*1000, 0), PolicyP99us: round(pctMs(polLat, 99)*1000, 0), Ratio: round(median(ratios), 3)}
		return nil
	})
	return res, err
}

// policyCluster is a policy for each sandbox with n rules: n-1 peers
// that never send, and the other sandbox on one port.
func policyCluster(n int, a, b netip.Addr) *policy.Cluster {
	mk := func(name string, peer netip.Addr, in bool) v1alpha1.NetworkPolicy {
		var peers []v1alpha1.NetworkPolicyPeer
		base := binary.BigEndian.Uint32([]byte{172, 16, 0, 0})
		for i := 0; i < n-1; i++ {
			var ip [4]byte
			binary.BigEndian.PutUint32(ip[:], base+uint32(i))
			peers = append(peers, v1alpha1.NetworkPolicyPeer{IPBlock: &v1alpha1.IPBlock{CIDR: netip.AddrFrom4(ip).String() + "/32"}})
		}
		peers = append(peers, v1alpha1.NetworkPolicyPeer{IPBlock: &v1alpha1.IPBlock{CIDR: peer.String() + "/32"}})
		spec := v1alpha1.NetworkPolicySpec{SandboxSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			PolicyTypes: []v1alpha1.PolicyType{v1alpha1.PolicyIngress, v1alpha1.PolicyEgress}}
		if in {
			spec.Ingress = []v1alpha1.NetworkPolicyIngressRule{{From: peers}}
		} else {
			spec.Egress = []v1alpha1.NetworkPolicyEgressRule{{To: peers}}
		}
		return v1alpha1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name}, Spec: spec}
	}
	return &policy.Cluster{
		Policies: []v1alpha1.NetworkPolicy{mk("a", b, false), mk("b", a, true)},
		Sandboxes: []policy.Sandbox{
			{Namespace: "bench", Name: "a", Labels: map[string]string{"app": "a"}, IP: a},
			{Namespace: "bench", Name: "b", Labels: map[string]string{"app": "b"}, IP: b},
		},
	}
}

// serveBench answers: a first byte 'b' starts a bulk sink, 'p' an echo of
// one byte at a time.
func serveBench(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 256<<10)
			if _, err := io.ReadFull(c, buf[:1]); err != nil {
				return
			}
			if buf[0] == 'b' {
				_, _ = io.CopyBuffer(io.Discard, c, buf)
				return
			}
			for {
				if _, err := io.ReadFull(c, buf[:1]); err != nil {
					return
				}
				if _, err := c.Write(buf[:1]); err != nil {
					return
				}
			}
		}()
	}
}

// bulk sends as fast as it can for d; MB/s.
func bulk(ctx context.Context, ns, addr string, d time.Duration) (float64, error) {
	c, err := nettest.Dial(ctx, ns, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	buf[0] = 'b'
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		m, err := c.Write(buf)
		n += int64(m)
		if err != nil {
			return 0, err
		}
	}
	return float64(n) / time.Since(start).Seconds() / 1e6, nil
}

// pingPong times one-byte round trips for d.
func pingPong(ctx context.Context, ns, addr string, d time.Duration) ([]time.Duration, error) {
	c, err := nettest.Dial(ctx, ns, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Write([]byte{'p'}); err != nil {
		return nil, err
	}
	var lat []time.Duration
	b := make([]byte, 1)
	start := time.Now()
	for time.Since(start) < d {
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, err
		}
		lat = append(lat, time.Since(t0))
	}
	return lat, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
