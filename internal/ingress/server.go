package ingress

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network"
	"hearth.dev/hearth/internal/pki"
)

// Config is one ingress.
type Config struct {
	// HTTP serves HTTP/1.1 and h2c; HTTPS serves TLS (h2 and HTTP/1.1).
	HTTP, HTTPS string
	// Domain is where PORT-SANDBOX-NAMESPACE host names live.
	Domain string
	// Sandboxes is the cluster's sandbox range: the only addresses the
	// ingress sends requests to.
	Sandboxes netip.Prefix
	// Routes installs routes to every host's sandbox range through the
	// host's address (when no node agent in this process does).
	Routes bool
	Scheme *kruntime.Scheme
	Log    *slog.Logger
}

// Run serves until ctx ends.
func Run(ctx context.Context, restCfg *rest.Config, cfg Config) error {
	c, err := cache.New(restCfg, cache.Options{Scheme: cfg.Scheme, DefaultUnsafeDisableDeepCopy: ptr.To(true)})
	if err != nil {
		return err
	}
	res := &apiResolver{reader: c, domain: cfg.Domain, sandboxes: cfg.Sandboxes, log: cfg.Log, certs: map[types.NamespacedName]certEntry{}}
	// Route changes rebuild the route index; Host changes (with Routes)
	// the routes to the hosts' ranges. Sandboxes and Secrets are read from
	// the cache per request.
	routesChanged, hostsChanged := make(chan struct{}, 1), make(chan struct{}, 1)
	watch := map[client.Object]chan struct{}{&v1alpha1.Route{}: routesChanged, &v1alpha1.Sandbox{}: nil, &corev1.Secret{}: nil}
	if cfg.Routes {
		watch[&v1alpha1.Host{}] = hostsChanged
	}
	for obj, ch := range watch {
		inf, err := c.GetInformer(ctx, obj)
		if err != nil {
			return err
		}
		if ch == nil {
			continue
		}
		kick := func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
		if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { kick() }, UpdateFunc: func(any, any) { kick() }, DeleteFunc: func(any) { kick() },
		}); err != nil {
			return err
		}
	}
	cacheErr := make(chan error, 1)
	go func() { cacheErr <- c.Start(ctx) }()
	if !c.WaitForCacheSync(ctx) {
		return fmt.Errorf("ingress: the API's caches did not sync")
	}
	if err := res.rebuild(ctx); err != nil {
		return err
	}
	fallback, err := selfSigned(cfg.Domain)
	if err != nil {
		return err
	}
	proxy := NewProxy(res, nil, cfg.Log)
	// Whatever ends Run stops both listeners' Serve.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, err := res.certificate(hello.Context(), hello.ServerName)
			if err != nil {
				cfg.Log.Warn("ingress certificate", "sni", hello.ServerName, "err", err)
			}
			if c == nil {
				return fallback, nil
			}
			return c, nil
		}}
	errc := make(chan error, 2)
	serving := 0
	for _, s := range []struct {
		addr string
		tls  *tls.Config
	}{{cfg.HTTP, nil}, {cfg.HTTPS, tlsConfig}} {
		if s.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("ingress: %w", err)
		}
		serving++
		go func() { errc <- Serve(ctx, ln, s.tls, proxy, cfg.Log) }()
	}
	cfg.Log.Info("ingress serving", "http", cfg.HTTP, "https", cfg.HTTPS, "domain", cfg.Domain)
	for {
		select {
		case <-ctx.Done():
			var errs []error
			for range serving {
				errs = append(errs, <-errc)
			}
			return errors.Join(errs...)
		case err := <-errc:
			if err == nil {
				err = errors.New("stopped")
			}
			return fmt.Errorf("ingress: %w", err)
		case err := <-cacheErr:
			return err
		case <-routesChanged:
			if err := res.rebuild(ctx); err != nil && ctx.Err() == nil {
				cfg.Log.Warn("ingress routes", "err", err)
			}
		case <-hostsChanged:
			if err := syncHostRoutes(ctx, c); err != nil && ctx.Err() == nil {
				cfg.Log.Warn("ingress: routes to the hosts' sandbox ranges", "err", err)
			}
		}
	}
}

// syncHostRoutes routes each host's sandbox range through its address.
func syncHostRoutes(ctx context.Context, c cache.Cache) error {
	var hosts v1alpha1.HostList
	if err := c.List(ctx, &hosts); err != nil {
		return err
	}
	return network.SyncPeers(network.HostRoutes(hosts.Items, ""))
}

// selfSigned is a development certificate for *.domain and domain.
func selfSigned(domain string) (*tls.Certificate, error) {
	certPEM, keyPEM, err := pki.SelfSigned([]string{"*." + domain, domain}, 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	return &c, err
}
