package apiserver

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/proxy"
	"k8s.io/apiserver/pkg/endpoints/handlers/responsewriters"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

// streamProxy serves the Sandbox stream subresources (exec, attach, log)
// by proxying them to the node agent that runs the sandbox, over TLS with
// the API server's client certificate, as kube-apiserver does for pods and
// kubelets. CRDs cannot have such subresources, so this handler sits inside
// the server's handler chain (after authentication, authorization and
// audit) in front of the CRD handler, on the same paths a built-in
// resource would have: /apis/hearth.dev/v1alpha1/namespaces/NS/sandboxes/NAME/exec.
type streamProxy struct {
	client client.Client // the server itself, through its loopback
	tls    *tls.Config
	// transports are by host: each accepts only that host's node agent
	// (nodeTransport).
	transports sync.Map // host name -> *http.Transport
}

func newStreamProxy(c Config, loopback *rest.Config) (*streamProxy, error) {
	cert, err := tls.LoadX509KeyPair(c.NodeClient.CertFile, c.NodeClient.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("node client certificate: %w", err)
	}
	// The client's REST mapper discovers lazily, at the first request, by
	// when the server serves.
	cl, err := client.New(loopback, client.Options{Scheme: Scheme})
	if err != nil {
		return nil, err
	}
	return &streamProxy{
		client: cl,
		tls:    &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: c.StreamsCA.Pool(), MinVersion: tls.VersionTLS12},
	}, nil
}

// nodeTransport is the transport to host's node agent. Past the CA and
// the address (which the node itself reports in its Host's status), it
// checks that the certificate is that host's: a node that claimed another
// host's address, or answered there, is not handed that host's streams.
func (p *streamProxy) nodeTransport(host string) *http.Transport {
	if t, ok := p.transports.Load(host); ok {
		return t.(*http.Transport)
	}
	cfg := p.tls.Clone()
	cfg.VerifyConnection = pki.IsNode(host)
	t, _ := p.transports.LoadOrStore(host, &http.Transport{TLSClientConfig: cfg})
	return t.(*http.Transport)
}

var streamPrefix = "/apis/" + v1alpha1.GroupVersion.Group + "/" + v1alpha1.GroupVersion.Version + "/namespaces/"

// parse splits /apis/hearth.dev/v1alpha1/namespaces/NS/sandboxes/NAME/SUB.
func parseStreamPath(path string) (ns, name, sub string, ok bool) {
	rest, ok := strings.CutPrefix(path, streamPrefix)
	if !ok {
		return "", "", "", false
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 4 || parts[1] != "sandboxes" || parts[0] == "" || parts[2] == "" {
		return "", "", "", false
	}
	for _, s := range v1alpha1.StreamSubresources {
		if parts[3] == s {
			return parts[0], parts[2], s, true
		}
	}
	return "", "", "", false
}

func (p *streamProxy) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ns, name, sub, ok := parseStreamPath(r.URL.Path)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		loc, host, err := p.locate(r, ns, name, sub)
		if err != nil {
			responsewriters.ErrorNegotiated(err, coreCodecs, v1alpha1.GroupVersion, w, r)
			return
		}
		// exec and attach must upgrade (SPDY or WebSocket); log is a
		// plain, possibly endless, response.
		h := proxy.NewUpgradeAwareHandler(loc, p.nodeTransport(host), false, sub != "log", responder{})
		h.ServeHTTP(w, r)
	})
}

// locate finds the node agent serving the sandbox, and its host's name.
func (p *streamProxy) locate(r *http.Request, ns, name, sub string) (*url.URL, string, error) {
	ctx := r.Context()
	var sb v1alpha1.Sandbox
	if err := p.client.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &sb); err != nil {
		return nil, "", err
	}
	if sb.Status.HostName == "" {
		return nil, "", apierrors.NewBadRequest(fmt.Sprintf("sandbox %s/%s is not on a host yet (phase %s)", ns, name, orPending(sb.Status.Phase)))
	}
	if sub != "log" && sb.Status.Phase != v1alpha1.PhaseRunning {
		return nil, "", apierrors.NewBadRequest(fmt.Sprintf("cannot %s: sandbox %s/%s is %s, not Running", sub, ns, name, orPending(sb.Status.Phase)))
	}
	var host v1alpha1.Host
	if err := p.client.Get(ctx, types.NamespacedName{Name: sb.Status.HostName}, &host); err != nil {
		return nil, "", err
	}
	if host.Status.Address == "" {
		return nil, "", apierrors.NewServiceUnavailable(fmt.Sprintf("host %s has no stream address", host.Name))
	}
	return &url.URL{Scheme: "https", Host: host.Status.Address, Path: v1alpha1.NodeStreamPath(ns, name, sub), RawQuery: r.URL.RawQuery}, host.Name, nil
}

func orPending(p v1alpha1.Phase) v1alpha1.Phase {
	if p == "" {
		return v1alpha1.PhasePending
	}
	return p
}

type responder struct{}

func (responder) Error(w http.ResponseWriter, _ *http.Request, err error) {
	http.Error(w, "proxy to the node agent: "+err.Error(), http.StatusBadGateway)
}

// Scheme holds hearth's API types for the clients in this process.
var Scheme = runtime.NewScheme()

func init() {
	must(v1alpha1.AddToScheme(Scheme))
}
