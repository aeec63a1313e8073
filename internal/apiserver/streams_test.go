package apiserver

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"k8s.io/client-go/rest"

	"hearth.dev/hearth/internal/pki"
)

func TestParseStreamPath(t *testing.T) {
	for _, tc := range []struct {
		path          string
		ns, name, sub string
		ok            bool
	}{
		{"/apis/hearth.dev/v1alpha1/namespaces/default/sandboxes/job-1/exec", "default", "job-1", "exec", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/log", "x", "y", "log", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/attach", "x", "y", "attach", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/status", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/hosts/y/exec", "", "", "", false},
		{"/api/v1/namespaces/x/pods/y/exec", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces//sandboxes/y/exec", "", "", "", false},
	} {
		ns, name, sub, ok := parseStreamPath(tc.path)
		if ns != tc.ns || name != tc.name || sub != tc.sub || ok != tc.ok {
			t.Errorf("%s: got %q %q %q %v", tc.path, ns, name, sub, ok)
		}
	}
}

// TestNodeTransportChecksHost: the stream proxy hands a host's streams
// only to that host's node agent, whatever address the Host reports.
func TestNodeTransportChecksHost(t *testing.T) {
	ca, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	serving, err := ca.Ensure(pki.NodeServingRequest("b", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	client, err := ca.Ensure(pki.Request{Name: "apiserver-node-client", CN: "hearth-apiserver", Groups: []string{pki.GroupAPIServer}, Client: true})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "streams of b") }))
	cert, err := tls.LoadX509KeyPair(serving.CertFile, serving.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()
	p, err := newStreamProxy(Config{CA: ca, StreamsCA: ca, NodeClient: client}, &rest.Config{Host: "https://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	get := func(host string) error {
		resp, err := (&http.Client{Transport: p.nodeTransport(host)}).Get(srv.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get("b"); err != nil {
		t.Errorf("host b's own node agent: %v", err)
	}
	if err := get("a"); err == nil || !strings.Contains(err.Error(), `is "hearth-node:b", not host a's`) {
		t.Errorf("host a's streams to b's node agent: %v, want refused", err)
	}
}
