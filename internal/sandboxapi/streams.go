// Package sandboxapi reaches a Sandbox's streams (exec, attach, log)
// through hearth's API server, as kubectl reaches a pod's: for the CLI and
// the benchmarks.
package sandboxapi

import (
	"context"
	"fmt"
	"io"
	"net/http"

	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"

	"hearth.dev/hearth/api/v1alpha1"
)

// Request is a request for a subresource of the sandbox namespace/name.
func Request(cfg *rest.Config, verb, namespace, name, sub string) (*rest.Request, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.GroupVersion = &v1alpha1.GroupVersion
	cfg.APIPath = "/apis"
	cfg.NegotiatedSerializer = clientgoscheme.Codecs.WithoutConversion()
	rc, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, err
	}
	return rc.Verb(verb).Namespace(namespace).Resource("sandboxes").Name(name).SubResource(sub), nil
}

// Stream runs exec or attach over the API server with SPDY, which the
// node agent's streaming library (the kubelet's) speaks. (kubectl prefers
// WebSocket v5, which kube-apiserver translates to SPDY for kubelets;
// hearth's API server proxies the connection as it is.) A nil stream is
// not asked for.
func Stream(ctx context.Context, cfg *rest.Config, namespace, name, sub string, command []string, tty bool,
	stdin io.Reader, stdout, stderr io.Writer, sizes remotecommand.TerminalSizeQueue) error {
	req, err := Request(cfg, http.MethodPost, namespace, name, sub)
	if err != nil {
		return err
	}
	// The parameters of Kubernetes' PodExecOptions.
	for _, c := range command {
		req = req.Param("command", c)
	}
	req = req.Param("stdin", fmt.Sprint(stdin != nil)).Param("stdout", fmt.Sprint(stdout != nil)).
		Param("stderr", fmt.Sprint(stderr != nil && !tty)).Param("tty", fmt.Sprint(tty))
	ex, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
	if err != nil {
		return err
	}
	so := remotecommand.StreamOptions{Stdin: stdin, Stdout: stdout, Tty: tty, TerminalSizeQueue: sizes}
	if !tty && stderr != nil {
		so.Stderr = stderr
	}
	return ex.StreamWithContext(ctx, so)
}
