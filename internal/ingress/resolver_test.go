package ingress

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"hearth.dev/hearth/api/v1alpha1"
)

func TestResolve(t *testing.T) {
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	sb := func(ns, name string, phase v1alpha1.Phase, ip string) *v1alpha1.Sandbox {
		return &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: v1alpha1.SandboxSpec{Ports: []v1alpha1.SandboxPort{{Name: "web", Port: 3000, Public: true}, {Port: 8080, Public: true},
				{Name: "admin", Port: 9000}}},
			Status: v1alpha1.SandboxStatus{Phase: phase, IP: ip}}
	}
	early := metav1.NewTime(time.Unix(1000, 0))
	route := func(name, host, prefix, sandbox string, port intstr.IntOrString, token string) *v1alpha1.Route {
		return &v1alpha1.Route{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: name, CreationTimestamp: early},
			Spec: v1alpha1.RouteSpec{Host: host, PathPrefix: prefix, Sandbox: sandbox, Port: port, AccessTokenSecret: token}}
	}
	// team-b's Routes on team-a's host name and on one of the ingress's
	// generated names: neither is served.
	later := func(r *v1alpha1.Route) *v1alpha1.Route {
		r.Namespace, r.CreationTimestamp = "team-b", metav1.NewTime(time.Unix(2000, 0))
		return r
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(
		sb("team-a", "my-app", v1alpha1.PhaseRunning, "10.244.0.5"),
		sb("team-a", "booting", v1alpha1.PhaseBooting, ""),
		sb("team-a", "done", v1alpha1.PhaseSucceeded, "10.244.0.6"),
		route("root", "app.example.com", "/", "my-app", intstr.FromString("web"), ""),
		route("api", "app.example.com", "/api", "my-app", intstr.FromInt32(8080), ""),
		route("admin", "app.example.com", "/admin", "my-app", intstr.FromInt32(9000), "tok"),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "tok"}, Data: map[string][]byte{"token": []byte("t0ken")}},
		later(route("steal", "app.example.com", "/admin", "thief", intstr.FromInt32(80), "")),
		later(route("generated", "8080-my-app-team-a.hearth.localhost", "/", "thief", intstr.FromInt32(80), "")),
		sb("team-b", "thief", v1alpha1.PhaseRunning, "10.244.1.9"),
		// A node that wrote a host's address as a sandbox's.
		sb("team-a", "elsewhere", v1alpha1.PhaseRunning, "192.168.1.1"),
	).Build()
	x := &apiResolver{reader: c, domain: "hearth.localhost", sandboxes: netip.MustParsePrefix("10.244.0.0/16"), certs: map[types.NamespacedName]certEntry{}}
	if err := x.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host, path, auth string
		addr             string
		code             int
	}{
		{"8080-my-app-team-a.hearth.localhost", "/", "", "10.244.0.5:8080", 0},
		{"8080-my-app-team-a.hearth.localhost:8480", "/", "", "10.244.0.5:8080", 0},
		{"web-my-app-team-a.hearth.localhost", "/", "", "10.244.0.5:3000", 0},
		{"8080-booting-team-a.hearth.localhost", "/", "", "", 503},
		{"8080-done-team-a.hearth.localhost", "/", "", "", 502},
		{"8080-nobody-team-a.hearth.localhost", "/", "", "", 502},
		{"nope-my-app-team-a.hearth.localhost", "/", "", "", 404},
		// Not public: reached only through its token-protected Route.
		{"9000-my-app-team-a.hearth.localhost", "/", "", "", 404},
		{"admin-my-app-team-a.hearth.localhost", "/", "", "", 404},
		{"22-my-app-team-a.hearth.localhost", "/", "", "", 404},
		{"a.b.hearth.localhost", "/", "", "", 404},
		{"elsewhere.example.com", "/", "", "", 404},
		{"app.example.com", "/", "", "10.244.0.5:3000", 0},
		{"app.example.com", "/api/v1", "", "10.244.0.5:8080", 0},
		{"app.example.com", "/apix", "", "10.244.0.5:3000", 0},
		{"app.example.com", "/admin", "", "", 401},
		{"app.example.com", "/admin/x", "Bearer nope", "", 401},
		{"app.example.com", "/admin/x", "Bearer t0ken", "10.244.0.5:9000", 0},
		{"8080-elsewhere-team-a.hearth.localhost", "/", "", "", 502},
	} {
		r := Request{Host: hostOnly(tc.host), Path: tc.path, Header: func(name string) string {
			if name == "Authorization" {
				return tc.auth
			}
			return ""
		}}
		got, no := x.Resolve(context.Background(), r)
		switch {
		case tc.code != 0 && (no == nil || no.Code != tc.code):
			t.Errorf("%s%s: %+v %+v, want %d", tc.host, tc.path, got, no, tc.code)
		case tc.code == 0 && (no != nil || got.Addr != tc.addr):
			t.Errorf("%s%s: %+v %+v, want %s", tc.host, tc.path, got, no, tc.addr)
		case tc.code == 0 && tc.auth != "" && !slices.Contains(got.Strip, "Authorization"):
			t.Errorf("%s%s: the access token would go on to the sandbox (strip %q)", tc.host, tc.path, got.Strip)
		}
	}
}

func FuzzMatchPath(f *testing.F) {
	f.Add("/api", "/api/v1")
	f.Add("/", "/x")
	f.Fuzz(func(t *testing.T, prefix, path string) {
		if matchPath(prefix, path) && prefix != "/" && len(path) < len(prefix)-1 {
			t.Errorf("%q matched the shorter %q", prefix, path)
		}
	})
}
