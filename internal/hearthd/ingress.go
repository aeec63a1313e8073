package hearthd

import (
	"context"
	"errors"
	"log/slog"
	"os"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"hearth.dev/hearth/internal/ingress"
)

// IngressOptions configure the ingress.
type IngressOptions struct {
	HTTP, HTTPS string
	Domain      string
	Kubeconfig  string
}

// AddFlags registers the ingress's flags.
func (o *IngressOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.HTTP, "ingress-http", "127.0.0.1:8480", "where the ingress serves HTTP/1.1 and h2c (empty: not at all)")
	fs.StringVar(&o.HTTPS, "ingress-https", "127.0.0.1:8443", "where the ingress serves TLS: h2 and HTTP/1.1 (empty: not at all)")
	fs.StringVar(&o.Domain, "ingress-domain", "hearth.localhost", "the ingress serves PORT-SANDBOX-NAMESPACE.DOMAIN (*.localhost names reach this machine without DNS)")
	fs.StringVar(&o.Kubeconfig, "ingress-kubeconfig", "", "the API server an ingress without the control-plane role reads routes and sandboxes from")
}

func startIngress(log *slog.Logger, loopback *rest.Config, o Options, start func(string, bool, func(context.Context) error)) error {
	cfg := loopback
	if cfg == nil {
		if o.Ingress.Kubeconfig == "" {
			return errors.New("the ingress role needs the control-plane role in the same hearthd, or --ingress-kubeconfig")
		}
		var err error
		if cfg, err = clientcmd.BuildConfigFromFlags("", o.Ingress.Kubeconfig); err != nil {
			return err
		}
	}
	ic := ingress.Config{HTTP: o.Ingress.HTTP, HTTPS: o.Ingress.HTTPS, Domain: o.Ingress.Domain, Sandboxes: o.Controllers.cluster, Scheme: Scheme, Log: log,
		// Without a node agent here, the ingress routes to the hosts'
		// sandbox ranges itself (as root: it changes the routing table).
		Routes: !o.has(RoleNode) && os.Geteuid() == 0}
	if len(o.Roles) == 1 {
		ingress.TuneGC() // a process that is an ingress and nothing else
	}
	start("ingress", true, func(ctx context.Context) error { return ingress.Run(ctx, cfg, ic) })
	return nil
}
