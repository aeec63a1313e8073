package ingress

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
)

// apiResolver resolves requests from the API: Routes by host and path
// prefix, then PORT-SANDBOX-NAMESPACE.DOMAIN host names for the ports a
// sandbox declares public.
type apiResolver struct {
	reader client.Reader // a cache: reads are cheap
	domain string        // without a leading dot
	// sandboxes is the cluster's sandbox range: a sandbox's status.ip
	// outside it (a node's lie: a host's address, a management network's)
	// is not dialed.
	sandboxes netip.Prefix
	log       *slog.Logger
	routes    atomic.Pointer[routeIndex]

	mu    sync.Mutex
	certs map[types.NamespacedName]certEntry
}

type certEntry struct {
	version string
	cert    *tls.Certificate
}

// routeIndex is every Route by host, longest path prefix first; it is
// rebuilt whenever a Route changes.
type routeIndex map[string][]*v1alpha1.Route

func (x *apiResolver) rebuild(ctx context.Context) error {
	var list v1alpha1.RouteList
	if err := x.reader.List(ctx, &list); err != nil {
		return err
	}
	idx, ignored := indexRoutes(list.Items, x.domain)
	for _, r := range ignored {
		if x.log != nil {
			x.log.Warn("route not served: its host is another namespace's, or one of the ingress's own names",
				"route", r.Namespace+"/"+r.Name, "host", r.Spec.Host)
		}
	}
	x.routes.Store(&idx)
	return nil
}

// indexRoutes indexes routes by host, longest path prefix first. A host
// is served for one namespace, that of its oldest Route (the API server
// refuses another namespace's Route for a host that has one; two made at
// once can both pass, and the first stays the owner); names under the
// ingress's domain are its generated ones (PORT-SANDBOX-NAMESPACE), which
// no Route takes. The rest are ignored.
func indexRoutes(routes []v1alpha1.Route, domain string) (routeIndex, []*v1alpha1.Route) {
	owner := map[string]*v1alpha1.Route{}
	for i := range routes {
		r := &routes[i]
		host := strings.ToLower(r.Spec.Host)
		if o, ok := owner[host]; !ok || older(r, o) {
			owner[host] = r
		}
	}
	idx := routeIndex{}
	var ignored []*v1alpha1.Route
	for i := range routes {
		r := &routes[i]
		host := strings.ToLower(r.Spec.Host)
		if strings.HasSuffix(host, "."+domain) || host == domain || r.Namespace != owner[host].Namespace {
			ignored = append(ignored, r)
			continue
		}
		idx[host] = append(idx[host], r)
	}
	for _, rs := range idx {
		sort.Slice(rs, func(i, j int) bool { return len(prefix(rs[i])) > len(prefix(rs[j])) })
	}
	return idx, ignored
}

// older orders Routes by creation, then namespace and name (a tie must
// not be decided by the order of a list).
func older(a, b *v1alpha1.Route) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	}
	if a.Namespace != b.Namespace {
		return a.Namespace < b.Namespace
	}
	return a.Name < b.Name
}

func prefix(r *v1alpha1.Route) string {
	if r.Spec.PathPrefix == "" {
		return "/"
	}
	return r.Spec.PathPrefix
}

// matchPath reports whether path is under prefix, by whole segments.
func matchPath(prefix, path string) bool {
	if prefix == "/" {
		return true
	}
	p := strings.TrimSuffix(prefix, "/")
	return path == p || strings.HasPrefix(path, p+"/")
}

func (x *apiResolver) route(host, path string) *v1alpha1.Route {
	idx := x.routes.Load()
	if idx == nil {
		return nil
	}
	for _, r := range (*idx)[host] {
		if matchPath(prefix(r), path) {
			return r
		}
	}
	return nil
}

// Resolve implements Resolver.
func (x *apiResolver) Resolve(ctx context.Context, r Request) (Target, *Refusal) {
	host := r.Host
	if rt := x.route(host, r.Path); rt != nil {
		strip, no := x.checkToken(ctx, r, rt)
		if no != nil {
			return Target{}, no
		}
		t, no := x.target(ctx, rt.Namespace, rt.Spec.Sandbox, rt.Spec.Port)
		t.Strip = strip
		t.Timeout = time.Duration(rt.Spec.TimeoutSeconds) * time.Second
		if t.Timeout == 0 {
			t.Timeout = 30 * time.Second
		}
		return t, no
	}
	label, ok := strings.CutSuffix(host, "."+x.domain)
	if !ok || strings.Contains(label, ".") {
		return Target{}, &Refusal{Code: http.StatusNotFound, Msg: fmt.Sprintf("no route for host %q", host)}
	}
	port, rest, ok := strings.Cut(label, "-")
	if !ok {
		return Target{}, &Refusal{Code: http.StatusNotFound, Msg: fmt.Sprintf("%q is not PORT-SANDBOX-NAMESPACE.%s", host, x.domain)}
	}
	// Both names may hold dashes: the split is the one that names a
	// sandbox that exists.
	var sb v1alpha1.Sandbox
	for i := strings.LastIndex(rest, "-"); i > 0; i = strings.LastIndex(rest[:i], "-") {
		if x.reader.Get(ctx, types.NamespacedName{Namespace: rest[i+1:], Name: rest[:i]}, &sb) == nil {
			if !public(&sb, port) {
				// Else any port, a Route's token-protected one too, would
				// be open to anyone who reaches the ingress.
				return Target{}, &Refusal{Code: http.StatusNotFound,
					Msg: fmt.Sprintf("port %s of sandbox %s/%s is not public (spec.ports[].public)", port, sb.Namespace, sb.Name)}
			}
			t, no := x.targetOf(&sb, intstr.Parse(port))
			t.Timeout = 30 * time.Second
			return t, no
		}
	}
	return Target{}, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("no sandbox for %q (want PORT-SANDBOX-NAMESPACE.%s)", host, x.domain)}
}

// public says whether the sandbox declares port (a number or a name)
// public, as a TCP port.
func public(sb *v1alpha1.Sandbox, port string) bool {
	for _, p := range sb.Spec.Ports {
		if p.Public && p.Protocol != v1alpha1.ProtocolUDP && (p.Name == port || strconv.Itoa(int(p.Port)) == port) {
			return true
		}
	}
	return false
}

func (x *apiResolver) target(ctx context.Context, ns, name string, port intstr.IntOrString) (Target, *Refusal) {
	var sb v1alpha1.Sandbox
	if err := x.reader.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &sb); err != nil {
		return Target{}, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("sandbox %s/%s does not exist", ns, name)}
	}
	return x.targetOf(&sb, port)
}

func (x *apiResolver) targetOf(sb *v1alpha1.Sandbox, port intstr.IntOrString) (Target, *Refusal) {
	name := sb.Namespace + "/" + sb.Name
	switch {
	case sb.Status.Phase.Terminal():
		return Target{}, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("sandbox %s has ended (%s)", name, sb.Status.Phase)}
	case sb.Status.Phase != v1alpha1.PhaseRunning || sb.Status.IP == "":
		return Target{}, &Refusal{Code: http.StatusServiceUnavailable, RetryAfter: 1,
			Msg: fmt.Sprintf("sandbox %s is not running yet (%s)", name, orPending(sb.Status.Phase))}
	}
	n := int(port.IntVal)
	if port.Type == intstr.String {
		if v, err := strconv.Atoi(port.StrVal); err == nil {
			n = v
		} else {
			n = 0
			for _, p := range sb.Spec.Ports {
				if p.Name == port.StrVal {
					n = int(p.Port)
				}
			}
		}
	}
	if n < 1 || n > 65535 {
		return Target{}, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("sandbox %s has no port %s", name, port.String())}
	}
	if a, err := netip.ParseAddr(sb.Status.IP); err != nil || !x.sandboxes.Contains(a) {
		if x.log != nil {
			x.log.Warn("a sandbox's address is outside the sandbox range; not dialed", "sandbox", name, "ip", sb.Status.IP, "range", x.sandboxes)
		}
		return Target{}, &Refusal{Code: http.StatusBadGateway, Msg: fmt.Sprintf("sandbox %s could not be reached", name)}
	}
	return Target{Addr: net.JoinHostPort(sb.Status.IP, strconv.Itoa(n))}, nil
}

func orPending(p v1alpha1.Phase) v1alpha1.Phase {
	if p == "" {
		return v1alpha1.PhasePending
	}
	return p
}

// checkToken enforces a Route's access token: "Authorization: Bearer
// TOKEN" or "X-Hearth-Token: TOKEN", compared in constant time; the
// token is not passed on to the sandbox: the headers to strip.
func (x *apiResolver) checkToken(ctx context.Context, r Request, rt *v1alpha1.Route) ([]string, *Refusal) {
	if rt.Spec.AccessTokenSecret == "" {
		return nil, nil
	}
	var sec corev1.Secret
	if err := x.reader.Get(ctx, types.NamespacedName{Namespace: rt.Namespace, Name: rt.Spec.AccessTokenSecret}, &sec); err != nil || len(sec.Data["token"]) == 0 {
		return nil, &Refusal{Code: http.StatusServiceUnavailable, Msg: fmt.Sprintf("route %s/%s: its access token secret %q is missing or has no token", rt.Namespace, rt.Name, rt.Spec.AccessTokenSecret)}
	}
	got := r.Header("X-Hearth-Token")
	strip := []string{"X-Hearth-Token"}
	if got == "" {
		if v, ok := strings.CutPrefix(r.Header("Authorization"), "Bearer "); ok {
			got, strip = v, append(strip, "Authorization")
		}
	}
	if got == "" {
		return nil, &Refusal{Code: http.StatusUnauthorized, Msg: "this route needs an access token (Authorization: Bearer TOKEN)"}
	}
	if subtle.ConstantTimeCompare([]byte(got), sec.Data["token"]) != 1 {
		return nil, &Refusal{Code: http.StatusUnauthorized, Msg: "wrong access token"}
	}
	return strip, nil
}

// certificate is the one for SNI name: a Route's TLS secret for that
// host, if any.
func (x *apiResolver) certificate(ctx context.Context, name string) (*tls.Certificate, error) {
	idx := x.routes.Load()
	if idx == nil {
		return nil, nil
	}
	for _, rt := range (*idx)[strings.ToLower(name)] {
		if rt.Spec.TLSSecret == "" {
			continue
		}
		key := types.NamespacedName{Namespace: rt.Namespace, Name: rt.Spec.TLSSecret}
		var sec corev1.Secret
		if err := x.reader.Get(ctx, key, &sec); err != nil {
			return nil, fmt.Errorf("route %s/%s: TLS secret %s: %w", rt.Namespace, rt.Name, key, err)
		}
		x.mu.Lock()
		e, ok := x.certs[key]
		x.mu.Unlock()
		if ok && e.version == sec.ResourceVersion {
			return e.cert, nil
		}
		c, err := tls.X509KeyPair(sec.Data[corev1.TLSCertKey], sec.Data[corev1.TLSPrivateKeyKey])
		if err != nil {
			return nil, fmt.Errorf("route %s/%s: TLS secret %s: %w", rt.Namespace, rt.Name, key, err)
		}
		x.mu.Lock()
		x.certs[key] = certEntry{version: sec.ResourceVersion, cert: &c}
		x.mu.Unlock()
		return &c, nil
	}
	return nil, nil
}
