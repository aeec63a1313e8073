// Package apiserver is hearth's Kubernetes API server, built on
// k8s.io/apiserver: hearth.dev/v1alpha1 Sandbox and Host are
// CustomResourceDefinitions (api/v1alpha1/crds) served by an embedded
// k8s.io/apiextensions-apiserver, which gives them OpenAPI schemas,
// validation, defaulting, server-side apply, the status subresource, field
// selectors and printer columns exactly as any cluster serves them. Under it,
// in the same process and handler chain, the core API that clients expect
// (namespaces, events, leases: core.go), and the sandbox streams (exec,
// attach, log) proxied to the node agents (streams.go). Clients authenticate
// with certificates from hearth's CA or hearth's bearer tokens (tokens.go);
// anonymous requests are refused. Requests are authorized by Kubernetes'
// RBAC (rbac.go, policy.go), and admitted past node restriction, quotas
// and the local-image rule (noderestriction.go, quota.go, admission.go);
// the audit log records who did what (audit.go). docs/tenancy.md.
package apiserver

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"time"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
	corev1 "k8s.io/api/core/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	extv1beta1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1beta1"
	extapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	extoptions "k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	extopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/group"
	"k8s.io/apiserver/pkg/authentication/request/bearertoken"
	unionauth "k8s.io/apiserver/pkg/authentication/request/union"
	x509request "k8s.io/apiserver/pkg/authentication/request/x509"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	discoveryendpoint "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	genericfilters "k8s.io/apiserver/pkg/server/filters"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	clientgoinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/component-base/compatibility"

	"hearth.dev/hearth/internal/apiserver/coreopenapi"
	"hearth.dev/hearth/internal/pki"
)

// Config is one API server.
type Config struct {
	BindAddress net.IP
	Port        int
	Serving     pki.Pair // its serving certificate
	CA          *pki.CA  // signs the clients it accepts (users, nodes, the admin)
	// StreamsCA signs the node agents' serving certificates and
	// NodeClient, the certificate it presents to them: an API client's
	// certificate is no key to a node's streams.
	StreamsCA  *pki.CA
	NodeClient pki.Pair
	// Etcd is how it reaches etcd: EtcdCA (a CA of etcd's own) signs
	// etcd's certificate and EtcdClient.
	EtcdServers []string
	EtcdCA      string
	EtcdClient  pki.Pair
	// IngressDomain is the ingress's domain, whose names no Route takes
	// ("": not checked).
	IngressDomain string
	// AuditLog is where the audit log is written ("": none).
	AuditLog string
	// AllowedRegistries, if any, are the only registries (host or
	// host:port) API users' sandboxes and templates may name.
	AllowedRegistries []string
	Log               *slog.Logger
}

// Server is a configured API server.
type Server struct {
	generic  *genericapiserver.GenericAPIServer
	loopback *rest.Config
}

// New builds the server; Run serves it.
func New(c Config) (*Server, error) {
	etcd := genericoptions.NewEtcdOptions(storagebackend.NewDefaultConfig("/registry", nil))
	etcd.StorageConfig.Transport.ServerList = c.EtcdServers
	etcd.StorageConfig.Transport.CertFile = c.EtcdClient.CertFile
	etcd.StorageConfig.Transport.KeyFile = c.EtcdClient.KeyFile
	etcd.StorageConfig.Transport.TrustedCAFile = c.EtcdCA

	serving := genericoptions.NewSecureServingOptions().WithLoopback()
	serving.BindAddress, serving.BindPort = c.BindAddress, c.Port
	serving.ServerCert.CertKey = genericoptions.CertKey{CertFile: c.Serving.CertFile, KeyFile: c.Serving.KeyFile}

	// The CRD server is the front of the delegation chain: it serves, and
	// what it does not serve goes down the chain to the core server. Its
	// loopback client (a token made here) is the one both use.
	extCfg := genericapiserver.NewRecommendedConfig(extapiserver.Codecs)
	if err := serving.ApplyTo(&extCfg.SecureServing, &extCfg.LoopbackClientConfig); err != nil {
		return nil, fmt.Errorf("serving: %w", err)
	}
	loopbackClient := kubernetes.NewForConfigOrDie(extCfg.LoopbackClientConfig)
	informers := clientgoinformers.NewSharedInformerFactory(loopbackClient, 10*time.Minute)
	extCfg.SharedInformerFactory = informers
	pulls, err := pullers(extCfg.LoopbackClientConfig)
	if err != nil {
		return nil, err
	}
	acc, err := newAccess(informers, authorizer.AuthorizerFunc(nodeSecrets{pullers: pulls}.Authorize))
	if err != nil {
		return nil, err
	}
	tokens := &tokenAuthenticator{
		secrets: loopbackClient.CoreV1().Secrets(pki.TokenNamespace), now: time.Now}
	applyAuth(&extCfg.Config, c.CA, acc, tokens)
	// The TLS handshake asks for client certificates signed by the CA.
	clientCA, err := dynamiccertificates.NewDynamicCAContentFromFile("client-ca", c.CA.CertFile())
	if err != nil {
		return nil, err
	}
	extCfg.SecureServing.ClientCA = clientCA
	// The CRD server is the front of the chain: its filters, audit's
	// among them, see every request.
	if err := applyAudit(&extCfg.Config, c.AuditLog); err != nil {
		return nil, err
	}

	coreCfg := genericapiserver.NewRecommendedConfig(coreCodecs)
	coreCfg.SecureServing, coreCfg.LoopbackClientConfig = extCfg.SecureServing, extCfg.LoopbackClientConfig
	coreCfg.SharedInformerFactory = informers
	// One aggregated discovery document (/apis, what kubectl and client-go
	// read) lists both servers' groups, the CRDs' among them, whichever
	// server of the chain answers it.
	discovery := discoveryendpoint.NewResourceManager("apis")
	coreCfg.AggregatedDiscoveryGroupManager, extCfg.AggregatedDiscoveryGroupManager = discovery, discovery
	applyAuth(&coreCfg.Config, c.CA, acc, tokens)
	ranges, err := hostRanges(extCfg.LoopbackClientConfig)
	if err != nil {
		return nil, err
	}
	nodes := nodeRestriction{hostRange: ranges}
	coreCfg.AdmissionControl = nodes
	// Server-side apply needs the types' OpenAPI models (generated by
	// `make generate` into coreopenapi).
	coreCfg.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(coreopenapi.GetOpenAPIDefinitions, openapinamer.NewDefinitionNamer(coreScheme))
	coreEtcd := *etcd
	coreEtcd.StorageConfig.Codec = coreCodecs.LegacyCodec(coreGroupVersions()...)
	if err := coreEtcd.ApplyTo(&coreCfg.Config); err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	core, err := coreCfg.Complete().New("hearth-core", genericapiserver.NewEmptyDelegate())
	if err != nil {
		return nil, fmt.Errorf("core API server: %w", err)
	}
	legacy, groups, quotaStorage, err := coreAPIGroups(coreCfg.RESTOptionsGetter, acc)
	if err != nil {
		return nil, err
	}
	if err := core.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, legacy); err != nil {
		return nil, fmt.Errorf("install core/v1: %w", err)
	}
	if err := core.InstallAPIGroups(groups...); err != nil {
		return nil, fmt.Errorf("install core groups: %w", err)
	}

	crdEtcd := *etcd
	crdEtcd.StorageConfig.Codec = extapiserver.Codecs.LegacyCodec(extv1beta1.SchemeGroupVersion, extv1.SchemeGroupVersion)
	if err := crdEtcd.ApplyTo(&extCfg.Config); err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	extCfg.MergedResourceConfig = extapiserver.DefaultAPIResourceConfigSource()
	quotas := &quotaAdmission{quotas: informers.Core().V1().ResourceQuotas().Lister(), store: &quotaStore{quotaStorage}}
	claims, err := routeClaims(extCfg.LoopbackClientConfig)
	if err != nil {
		return nil, err
	}
	limits := limitAdmission{ranges: informers.Core().V1().LimitRanges().Lister(), synced: informers.Core().V1().LimitRanges().Informer().HasSynced}
	extCfg.AdmissionControl = admission.NewChainHandler(finalizerAdmission{}, limits, nodes, imageAdmission{allowed: c.AllowedRegistries}, routeHostAdmission{claims: claims, domain: c.IngressDomain,
		namespace: func(ctx context.Context, name string) (*corev1.Namespace, error) {
			return loopbackClient.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		}}, quotas)
	namer := openapinamer.NewDefinitionNamer(extapiserver.Scheme, clientgoscheme.Scheme)
	defs := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(extopenapi.GetOpenAPIDefinitions)
	extCfg.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, namer)
	extCfg.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, namer)
	// Streams are long-running like watches: no request timeout for them.
	extCfg.LongRunningFunc = genericfilters.BasicLongRunningRequestCheck(
		sets.NewString("watch", "proxy"), sets.NewString("attach", "exec", "proxy", "log", "portforward"))
	streams, err := newStreamProxy(c, extCfg.LoopbackClientConfig)
	if err != nil {
		return nil, err
	}
	extCfg.BuildHandlerChainFunc = func(h http.Handler, gc *genericapiserver.Config) http.Handler {
		return genericapiserver.DefaultBuildHandlerChain(streams.wrap(h), gc)
	}
	ext := &extapiserver.Config{
		GenericConfig: extCfg,
		ExtraConfig: extapiserver.ExtraConfig{
			CRDRESTOptionsGetter: extoptions.NewCRDRESTOptionsGetter(crdEtcd, nil, extCfg.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, extCfg.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
			MasterCount:          1,
		},
	}
	server, err := ext.Complete().New(core)
	if err != nil {
		return nil, fmt.Errorf("CRD API server: %w", err)
	}
	s := &Server{generic: server.GenericAPIServer, loopback: extCfg.LoopbackClientConfig}
	server.GenericAPIServer.AddPostStartHookOrDie("hearth-informers", func(hc genericapiserver.PostStartHookContext) error {
		informers.Start(hc.Done())
		return nil
	})
	server.GenericAPIServer.AddPostStartHookOrDie("hearth-rbac-policy", func(hc genericapiserver.PostStartHookContext) error {
		err := installPolicy(hc, s.loopback, acc, c.Log)
		if err != nil {
			c.Log.Error("hearth's default RBAC policy is not installed", "err", err)
		}
		return err
	})
	server.GenericAPIServer.AddPostStartHookOrDie("hearth-crds", func(hc genericapiserver.PostStartHookContext) error {
		err := InstallCRDs(hc, s.loopback, c.Log)
		if err != nil {
			c.Log.Error("hearth's CRDs are not served", "err", err)
		}
		return err
	})
	return s, nil
}

// applyAuth sets what both servers of the chain share: authentication by
// client certificate or hearth's bearer token (every user so
// authenticated is also in system:authenticated), authorization and the
// version they report.
func applyAuth(gc *genericapiserver.Config, ca *pki.CA, acc *access, tokens authenticator.Token) {
	roots := ca.Pool()
	certs := x509request.NewDynamic(func() (x509.VerifyOptions, bool) {
		return x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, true
	}, x509request.CommonNameUserConversion)
	gc.Authentication.Authenticator = group.NewAuthenticatedGroupAdder(unionauth.New(certs, bearertoken.New(tokens)))
	gc.Authorization.Authorizer = acc.authorizer
	gc.EffectiveVersion = compatibility.NewEffectiveVersionFromString(KubeVersion, "", "")
	gc.EnableProfiling = false
}

// KubeVersion is the Kubernetes API version hearth serves (that of the
// k8s.io libraries it is built with).
const KubeVersion = "1.37"

// Loopback is a client configuration that reaches this server as a
// privileged user, for the controllers that run in the same process.
func (s *Server) Loopback() *rest.Config { return rest.CopyConfig(s.loopback) }

// Run serves until ctx ends, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	return s.generic.PrepareRun().RunWithContext(ctx)
}

func coreGroupVersions() []schema.GroupVersion {
	gvs := make([]schema.GroupVersion, 0, len(coreKinds))
	for gv := range coreKinds {
		gvs = append(gvs, gv)
	}
	return gvs
}

// noServices resolves no Services: hearth has none, so CRD conversion
// webhooks (which name a Service) are not supported.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: hearth serves no Services", namespace, name)
}
