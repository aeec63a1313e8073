package policy

import (
	"net/netip"
	"reflect"
	"testing"

	"sigs.k8s.io/yaml"

	"hearth.dev/hearth/api/v1alpha1"
)

func policyFrom(t *testing.T, y string) v1alpha1.NetworkPolicy {
	t.Helper()
	var p v1alpha1.NetworkPolicy
	if err := yaml.Unmarshal([]byte(y), &p); err != nil {
		t.Fatal(err)
	}
	if p.Namespace == "" {
		p.Namespace = "default"
	}
	return p
}

func TestCompile(t *testing.T) {
	tcp := v1alpha1.ProtocolTCP
	a := Sandbox{Namespace: "default", Name: "a", Labels: map[string]string{"app": "a"}, IP: netip.MustParseAddr("10.244.0.2")}
	b := Sandbox{Namespace: "default", Name: "b", Labels: map[string]string{"app": "b"}, IP: netip.MustParseAddr("10.244.1.2"),
		Ports: []v1alpha1.SandboxPort{{Name: "http", Port: 8080, Protocol: tcp}}}
	other := Sandbox{Namespace: "other", Name: "a", Labels: map[string]string{"app": "a"}, IP: netip.MustParseAddr("10.244.2.2")}
	c := &Cluster{Sandboxes: []Sandbox{a, b, other}, Namespaces: map[string]map[string]string{"other": {"team": "x"}}}
	p32 := func(s Sandbox) netip.Prefix { return netip.PrefixFrom(s.IP, 32) }
	for _, tc := range []struct {
		name   string
		policy string
		sb     Sandbox
		want   Result
	}{
		{"named port from a sandbox selector", `
spec:
  sandboxSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{sandboxSelector: {matchLabels: {app: a}}}]
    ports: [{port: http, protocol: TCP}]`, b,
			Result{IngressIsolated: true, Ingress: Rules{p32(a): {{ProtoTCP, 8080, 8080}}}}},
		{"not selected", `
spec:
  sandboxSelector: {matchLabels: {app: b}}
  ingress: [{}]`, a, Result{}},
		{"namespace selector, range, ICMP", `
spec:
  sandboxSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: x}}}]
    ports: [{port: 9000, endPort: 9100, protocol: UDP}, {protocol: ICMP}]`, a,
			Result{IngressIsolated: true, Ingress: Rules{p32(other): {{ProtoICMP, 0, 65535}, {ProtoUDP, 9000, 9100}}}}},
		{"ipBlock except, egress only", `
spec:
  sandboxSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.2/32]}}]
  - to: [{sandboxSelector: {matchLabels: {app: b}}}]
    ports: [{port: http}]`, a,
			Result{EgressIsolated: true, Egress: Rules{
				netip.MustParsePrefix("10.244.0.0/16"): {anyPort},
				p32(b):                                 {{ProtoTCP, 8080, 8080}},
			}}},
		{"deny all ingress", `
spec:
  sandboxSelector: {}`, a, Result{IngressIsolated: true, Ingress: Rules{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.Policies = []v1alpha1.NetworkPolicy{policyFrom(t, tc.policy)}
			got := Compile(c, tc.sb)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestCompileIsolatesNamespaces(t *testing.T) {
	a := Sandbox{Namespace: "team-a", Name: "a", IP: netip.MustParseAddr("10.244.0.2")}
	a2 := Sandbox{Namespace: "team-a", Name: "a2", IP: netip.MustParseAddr("10.244.1.7")}
	b := Sandbox{Namespace: "team-b", Name: "b", Labels: map[string]string{"app": "b"}, IP: netip.MustParseAddr("10.244.1.2")}
	cluster := netip.MustParsePrefix("10.244.0.0/16")
	c := &Cluster{Sandboxes: []Sandbox{a, a2, b}, IsolateNamespaces: true, Range: cluster}

	// No policy: its own namespace and everything outside the range.
	got := Compile(c, a)
	want := Result{IngressIsolated: true, Ingress: Rules{
		everywhere:                  {anyPort},
		cluster:                     {},
		netip.PrefixFrom(a.IP, 32):  {anyPort},
		netip.PrefixFrom(a2.IP, 32): {anyPort},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("isolated by namespace:\ngot  %+v\nwant %+v", got, want)
	}
	// b's own namespace allows team-a: its policy decides, not the
	// isolation.
	p := policyFrom(t, `
metadata: {namespace: team-b}
spec:
  sandboxSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: team-a}}}]`)
	c.Policies = []v1alpha1.NetworkPolicy{p}
	got = Compile(c, b)
	want = Result{IngressIsolated: true, Ingress: Rules{netip.PrefixFrom(a.IP, 32): {anyPort}, netip.PrefixFrom(a2.IP, 32): {anyPort}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("a policy that allows another namespace:\ngot  %+v\nwant %+v", got, want)
	}
	// The setting off: nothing isolated without a policy.
	c.IsolateNamespaces = false
	if got := Compile(c, a); !reflect.DeepEqual(got, Result{}) {
		t.Errorf("without namespace isolation: %+v", got)
	}
}
