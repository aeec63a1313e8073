// Package hearthd runs hearth's daemon roles in one process: the control
// plane (embedded etcd, the API server, the scheduler) and the node agent.
// `hearth up` and `hearthd` with no --roles run all of them on one machine
// with one data directory.
package hearthd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"hearth.dev/hearth/internal/apiserver"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/etcd"
	"hearth.dev/hearth/internal/pki"
)

// Roles hearthd can run.
const (
	RoleControlPlane = "control-plane"
	RoleNode         = "node"
	RoleIngress      = "ingress"
)

// Options configure hearthd.
type Options struct {
	DataDir     string
	Roles       []string
	BindAddress string
	Port        int
	// Etcd's ports on loopback.
	EtcdClientPort, EtcdPeerPort int
	// AdvertiseAddress is the address node agents and clients use; it is
	// also in the serving certificate.
	AdvertiseAddress string
	// AllowedRegistries, if any, are the only registries API users'
	// images come from.
	AllowedRegistries []string
	Node              NodeOptions
	Controllers       ControllerOptions
	Ingress           IngressOptions
	Version           string
}

// AddFlags registers the options as flags.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.DataDir, "data-dir", config.DataDir(), "where etcd's data, the CA, the kubeconfig and the node agent's state live")
	fs.StringSliceVar(&o.Roles, "roles", []string{RoleControlPlane, RoleNode, RoleIngress}, "roles to run: control-plane, node, ingress")
	fs.StringVar(&o.BindAddress, "bind-address", "127.0.0.1", "address the API server listens on")
	fs.IntVar(&o.Port, "port", 6443, "API server port")
	fs.IntVar(&o.EtcdClientPort, "etcd-client-port", 2379, "embedded etcd's client port (loopback only)")
	fs.IntVar(&o.EtcdPeerPort, "etcd-peer-port", 2380, "embedded etcd's peer port (loopback only)")
	fs.StringVar(&o.AdvertiseAddress, "advertise-address", "", "address clients and node agents reach the API server at (default: --bind-address)")
	fs.StringSliceVar(&o.AllowedRegistries, "allowed-registries", nil, "the only registries (host or host:port; Docker Hub is index.docker.io) API users' sandboxes and templates may pull from (default: any; the admin's are not checked)")
	o.Controllers.AddFlags(fs)
	o.Node.AddFlags(fs)
	o.Ingress.AddFlags(fs)
}

// DefaultOptions are the options with every flag's default, for a hearthd
// run in-process (the benchmarks): a caller that builds Options by hand
// misses every option added after it was written.
func DefaultOptions() Options {
	var o Options
	o.AddFlags(pflag.NewFlagSet("hearthd", pflag.ContinueOnError))
	return o
}

// Kubeconfig is the admin kubeconfig's path in dataDir.
func Kubeconfig(dataDir string) string { return filepath.Join(dataDir, "kubeconfig") }

func (o *Options) has(role string) bool { return slices.Contains(o.Roles, role) }

func (o *Options) validate() error {
	for _, r := range o.Roles {
		if r != RoleControlPlane && r != RoleNode && r != RoleIngress {
			return fmt.Errorf("--roles: unknown role %q (want control-plane, node, ingress)", r)
		}
	}
	if len(o.Roles) == 0 {
		return errors.New("--roles: give at least one role")
	}
	if o.DataDir == "" {
		return errors.New("--data-dir is empty")
	}
	if err := o.Controllers.validate(); err != nil {
		return err
	}
	if o.has(RoleNode) {
		// Before anything starts: a production node without KVM fails
		// here, not after its control plane came up.
		if _, err := o.Node.accel(); err != nil {
			return err
		}
	}
	if net.ParseIP(o.BindAddress) == nil {
		return fmt.Errorf("--bind-address %q is not an IP address", o.BindAddress)
	}
	if o.AdvertiseAddress == "" {
		o.AdvertiseAddress = o.BindAddress
		if ip := net.ParseIP(o.BindAddress); ip.IsUnspecified() {
			o.AdvertiseAddress = "127.0.0.1"
		}
	}
	return nil
}

// controlPlaneGCPercent is the garbage collector's target (GOGC) in a
// process with the control-plane role, unless GOGC is set. The API
// server's request path (JSON into unstructured objects, schema coercion,
// managed fields, the watch cache's decoding) allocates heavily: at Go's
// default of 100 the collector's marking alone takes ~12% of the CPU. At
// 200 a create or a status write costs 11-20% less CPU, for about 30% more
// peak memory (hearth-bench api, 2,000 sandboxes: 315 -> 405 MiB RSS).
const controlPlaneGCPercent = 200

// Run runs the roles until ctx ends, then shuts them down. ready, if not
// nil, is called once every role serves, with the admin kubeconfig's path
// ("" without the control-plane role).
func Run(ctx context.Context, log *slog.Logger, o Options, ready func(kubeconfig string)) error {
	if err := o.validate(); err != nil {
		return err
	}
	dataDir, err := filepath.Abs(o.DataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	// Two tiers: the servers (etcd, the API server) and the workers that
	// use them (controllers, the node agent). Shutdown stops the workers
	// first, so that they do not spend their last moments failing to reach
	// a server that is already gone.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	serveCtx, stopServers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopServers()
	workCtx, stopWorkers := context.WithCancel(ctx)
	defer stopWorkers()
	var servers, workers []<-chan struct{}
	start := func(name string, worker bool, f func(context.Context) error) {
		done := make(chan struct{})
		runCtx := serveCtx
		if worker {
			runCtx, workers = workCtx, append(workers, done)
		} else {
			servers = append(servers, done)
		}
		go func() {
			defer close(done)
			if err := f(runCtx); err != nil && runCtx.Err() == nil {
				// Said at once: the shutdown that follows may take a
				// minute, and whoever waits on Run sees only its end.
				log.Error("stopping hearthd: a part failed", "part", name, "err", err)
				cancel(fmt.Errorf("%s: %w", name, err))
			}
		}()
	}
	shutdown := func() {
		stopWorkers()
		waitAll(workers)
		stopServers()
		waitAll(servers)
	}

	var loopback *rest.Config
	if o.has(RoleControlPlane) {
		if _, set := os.LookupEnv("GOGC"); !set {
			debug.SetGCPercent(controlPlaneGCPercent)
		}
		cp, err := startControlPlane(serveCtx, log, dataDir, o, start)
		if err != nil {
			cancel(err)
			shutdown()
			if cp != nil {
				cp.close()
			}
			return err
		}
		defer cp.close()
		loopback = cp.loopback
	}
	if o.has(RoleIngress) {
		if err := startIngress(log, loopback, o, start); err != nil {
			cancel(err)
			shutdown()
			return err
		}
	}
	if o.has(RoleNode) {
		if err := startNode(log, dataDir, o, start); err != nil {
			cancel(err)
			shutdown()
			return err
		}
	}
	if ready != nil {
		kc := ""
		if o.has(RoleControlPlane) {
			kc = Kubeconfig(dataDir)
		}
		ready(kc)
	}
	<-ctx.Done()
	shutdown()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func waitAll(waits []<-chan struct{}) {
	for _, w := range waits {
		<-w
	}
}

// apiServerCN names the API server's certificates, the one identity etcd
// serves.
const apiServerCN = "hearth-apiserver"

type controlPlane struct {
	member   *etcd.Member
	loopback *rest.Config
}

func (cp *controlPlane) close() {
	if cp.member != nil {
		cp.member.Close()
	}
}

func startControlPlane(ctx context.Context, log *slog.Logger, dataDir string, o Options, start func(string, bool, func(context.Context) error)) (*controlPlane, error) {
	// Three CAs, so that no identity of one reaches the others: the API's
	// (its serving certificate, the admin's, users' and nodes' client
	// certificates), etcd's (etcd and the API server's client to it) and
	// the streams' (node agents' serving certificates and the API server's
	// client to them).
	ca, err := pki.LoadOrCreateCA(filepath.Join(dataDir, "pki"))
	if err != nil {
		return nil, err
	}
	etcdCA, err := pki.LoadOrCreateCA(filepath.Join(dataDir, "pki", pki.EtcdDir))
	if err != nil {
		return nil, err
	}
	streamsCA, err := pki.LoadOrCreateCA(filepath.Join(dataDir, "pki", pki.StreamsDir))
	if err != nil {
		return nil, err
	}
	hostname, _ := os.Hostname()
	issue := func(r pki.Request) (pki.Pair, error) { return ca.Ensure(r) }
	etcdServing, err := etcdCA.Ensure(pki.Request{Name: "etcd", CN: "etcd", Hosts: []string{"127.0.0.1", "localhost"}, Server: true, Client: true})
	if err != nil {
		return nil, err
	}
	etcdClient, err := etcdCA.Ensure(pki.Request{Name: "apiserver-etcd-client", CN: apiServerCN, Client: true})
	if err != nil {
		return nil, err
	}
	hosts := []string{"127.0.0.1", "localhost", o.AdvertiseAddress}
	if hostname != "" {
		hosts = append(hosts, hostname)
	}
	serving, err := issue(pki.Request{Name: "apiserver", CN: apiServerCN, Hosts: hosts, Server: true})
	if err != nil {
		return nil, err
	}
	nodeClient, err := streamsCA.Ensure(pki.Request{Name: "apiserver-node-client", CN: apiServerCN, Groups: []string{pki.GroupAPIServer}, Client: true})
	if err != nil {
		return nil, err
	}
	admin, err := issue(pki.Request{Name: "admin", CN: "hearth-admin", Groups: []string{pki.GroupAdmin}, Client: true})
	if err != nil {
		return nil, err
	}
	server := "https://" + net.JoinHostPort(o.AdvertiseAddress, strconv.Itoa(o.Port))
	if err := writeKubeconfig(Kubeconfig(dataDir), server, ca, admin); err != nil {
		return nil, err
	}

	clientURL := "https://127.0.0.1:" + strconv.Itoa(o.EtcdClientPort)
	member, err := etcd.Start(ctx, log, etcd.Config{
		Name:      "hearth",
		DataDir:   filepath.Join(dataDir, "etcd"),
		ClientURL: clientURL,
		PeerURL:   "https://127.0.0.1:" + strconv.Itoa(o.EtcdPeerPort),
		CertFile:  etcdServing.CertFile, KeyFile: etcdServing.KeyFile, CAFile: etcdCA.CertFile(),
		ClientCNs: []string{apiServerCN},
	})
	if err != nil {
		return nil, err
	}
	cp := &controlPlane{member: member}
	srv, err := apiserver.New(apiserver.Config{
		BindAddress:       net.ParseIP(o.BindAddress),
		Port:              o.Port,
		Serving:           serving,
		CA:                ca,
		StreamsCA:         streamsCA,
		NodeClient:        nodeClient,
		EtcdServers:       []string{clientURL},
		EtcdCA:            etcdCA.CertFile(),
		EtcdClient:        etcdClient,
		AuditLog:          filepath.Join(dataDir, "audit.log"),
		AllowedRegistries: o.AllowedRegistries,
		IngressDomain:     o.Ingress.Domain,
		Log:               log,
	})
	if err != nil {
		cp.close()
		return nil, err
	}
	cp.loopback = srv.Loopback()
	start("etcd", false, func(ctx context.Context) error {
		select {
		case err := <-member.Err():
			return err
		case <-ctx.Done():
			return nil
		}
	})
	start("api server", false, srv.Run)
	if err := waitReady(ctx, cp.loopback); err != nil {
		return cp, err
	}
	log.Info("API server ready", "url", server)
	if !o.Controllers.Disabled {
		start("controllers", true, func(ctx context.Context) error { return runControllers(ctx, log, cp.loopback, o.Controllers) })
	}
	return cp, nil
}

// waitReady waits until the API server answers /readyz, which includes the
// post-start hook that installs and establishes the CRDs.
func waitReady(ctx context.Context, cfg *rest.Config) error {
	c, err := rest.UnversionedRESTClientFor(withNegotiation(cfg))
	if err != nil {
		return err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		err := c.Get().AbsPath("/readyz").Do(ctx).Error()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("API server not ready after 2 minutes: %w", err)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func withNegotiation(cfg *rest.Config) *rest.Config {
	c := rest.CopyConfig(cfg)
	c.NegotiatedSerializer = clientcmdNegotiator
	return c
}

func writeKubeconfig(path, server string, ca *pki.CA, user pki.Pair) error {
	caData, err := os.ReadFile(ca.CertFile())
	if err != nil {
		return err
	}
	certData, err := os.ReadFile(user.CertFile)
	if err != nil {
		return err
	}
	keyData, err := os.ReadFile(user.KeyFile)
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["hearth"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caData}
	cfg.AuthInfos["hearth-admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: certData, ClientKeyData: keyData}
	cfg.Contexts["hearth"] = &clientcmdapi.Context{Cluster: "hearth", AuthInfo: "hearth-admin", Namespace: "default"}
	cfg.CurrentContext = "hearth"
	return clientcmd.WriteToFile(*cfg, path)
}
