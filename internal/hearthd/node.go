package hearthd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/node"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

// NodeOptions configure the node agent.
type NodeOptions struct {
	Name         string
	Zone         string
	Server       string
	Heartbeat    time.Duration
	Listen       string
	Address      string
	Labels       map[string]string
	MaxSandboxes int
	CPU, Memory  string
	Accel        string
	AllowTCG     bool
	VMDir        string
	InsecureRegs []string
	PrivateRegs  []string
	LogMaxBytes  int64
	Network      bool
}

// AddFlags registers the node agent's flags.
func (o *NodeOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Name, "node-name", "", "this host's name in the API (default: the hostname)")
	fs.StringVar(&o.Listen, "node-listen", "127.0.0.1:10250", "where the node agent serves sandbox streams to the API server")
	fs.StringVar(&o.Address, "node-address", "", "how the API server reaches the node agent (default: --node-listen)")
	fs.StringToStringVar(&o.Labels, "node-labels", nil, "labels of this host, for sandboxes' hostSelector (k=v,...)")
	fs.StringVar(&o.Zone, "zone", "", "this host's failure domain (the topology.hearth.dev/zone label, for spreading replicas)")
	fs.StringVar(&o.Server, "server", "", "the API server a node-only hearthd joins (https://HOST:PORT; default: this machine's, from --advertise-address and --port)")
	fs.DurationVar(&o.Heartbeat, "heartbeat-interval", 10*time.Second, "how often the node agent renews its host's lease")
	fs.IntVar(&o.MaxSandboxes, "max-sandboxes", 100, "most sandboxes this host runs at once")
	fs.StringVar(&o.CPU, "node-cpu", "", "CPUs this host offers to sandboxes (default: all)")
	fs.StringVar(&o.Memory, "node-memory", "", "memory this host offers to sandboxes (default: all)")
	fs.StringVar(&o.Accel, "accel", "auto", "how guests run: kvm, tcg or auto")
	fs.StringVar(&o.VMDir, "vm-dir", "", "where VMs' writable disks, memory files and sockets live (default: DATA-DIR/node/vms): a real filesystem, not a tmpfs; each VM's disk and memory file are reserved there when made, and its free space is the host's allocatable disk")
	fs.BoolVar(&o.AllowTCG, "allow-tcg", false, "development only: run guests under TCG software emulation where there is no usable KVM (or with --accel tcg); TCG is no security boundary, so without this flag a node agent refuses it ('hearth up' sets it)")
	fs.StringSliceVar(&o.InsecureRegs, "insecure-registry", nil, "reach this registry (host:port) over plain HTTP; localhost always is")
	fs.StringSliceVar(&o.PrivateRegs, "private-registry", nil, "let sandboxes pull from this registry (host or host:port) although it is on a loopback, private or link-local address (others there are refused: a tenant's image reference must not reach the host's own network); --insecure-registry ones may too")
	fs.Int64Var(&o.LogMaxBytes, "log-max-bytes", 10<<20, "a run's log is rotated at this size; twice it is kept")
	fs.BoolVar(&o.Network, "network", true, "give sandboxes a network: taps, addresses, routes, NAT, DNS and policies on this host (off: their interface is connected to nothing)")
}

// accel is how this node's guests run: --accel, where TCG needs
// --allow-tcg.
func (n *NodeOptions) accel() (vmm.Accel, error) {
	accel, err := vmm.ParseAccel(n.Accel)
	if err != nil {
		return "", err
	}
	if accel == vmm.TCG && !n.AllowTCG {
		why := "--accel tcg"
		if n.Accel != "tcg" {
			why = "no usable KVM (" + vmm.KVMReason() + ")"
		}
		return "", fmt.Errorf("%w: %s: guests would run under TCG software emulation, which is no security boundary; on a development host give --allow-tcg ('hearth up' does)", ErrTCGRefused, why)
	}
	return accel, nil
}

// ErrTCGRefused is why a node agent without --allow-tcg does not start
// where its guests would run under TCG.
var ErrTCGRefused = errors.New("the node agent refuses TCG")

func startNode(log *slog.Logger, dataDir string, o Options, start func(string, bool, func(context.Context) error)) error {
	n := o.Node
	name := n.Name
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return err
		}
		name = strings.ToLower(h)
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("--node-name %q: %s", name, strings.Join(errs, "; "))
	}
	accel, err := n.accel()
	if err != nil {
		return err
	}
	if accel == vmm.TCG {
		log.Warn("development mode (--allow-tcg): guests run under TCG software emulation, which is not a security boundary")
	}
	if n.Network && os.Geteuid() != 0 {
		log.Warn("not root: sandboxes get no network (taps, routes and policy programs need root)")
		n.Network = false
	}
	cfg := node.Config{
		Name: name, Labels: n.Labels, Zone: n.Zone, Heartbeat: n.Heartbeat, Listen: n.Listen, Address: n.Address,
		Images:       &image.Store{Dir: config.ImageDir(), Log: log},
		MaxSandboxes: n.MaxSandboxes, Accel: accel, InsecureRegistries: n.InsecureRegs, PrivateRegistries: n.PrivateRegs,
		StateDir: filepath.Join(dataDir, "node", "sandboxes"), VMDir: n.VMDir, LogMax: n.LogMaxBytes,
		SnapshotDir: filepath.Join(dataDir, "node", "snapshots"), TemplateDir: filepath.Join(dataDir, "node", "templates"),
		Version: o.Version, Log: log, Scheme: Scheme, Logr: logrFrom(log), ClusterCIDR: o.Controllers.cluster,
		Network: n.Network, IsolateNamespaces: o.Controllers.IsolateNamespaces,
	}
	if cfg.Address == "" {
		cfg.Address = n.Listen
	}
	for _, q := range []struct {
		flag, v string
		dst     *resource.Quantity
	}{{"--node-cpu", n.CPU, &cfg.CPU}, {"--node-memory", n.Memory, &cfg.Memory}} {
		if q.v == "" {
			continue
		}
		if *q.dst, err = resource.ParseQuantity(q.v); err != nil {
			return fmt.Errorf("%s %q: %w", q.flag, q.v, err)
		}
	}
	if cfg.Shim, err = config.Shim(); err != nil {
		return err
	}
	if cfg.Host, err = sandbox.HostFromEnv(""); err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(cfg.Address)
	if err != nil {
		return fmt.Errorf("--node-address %q: %w", cfg.Address, err)
	}
	// The node's certificates: issued here when the data directory holds
	// the CA's key (the node runs beside the control plane), else those
	// `hearth host credentials` wrote for it on the control plane.
	ca, err := pki.LoadCA(filepath.Join(dataDir, "pki"), !o.has(RoleControlPlane))
	if err != nil {
		return err
	}
	streamsCA, err := pki.LoadCA(filepath.Join(dataDir, "pki", pki.StreamsDir), !o.has(RoleControlPlane))
	if err != nil {
		return credentialsHint(err, name, host)
	}
	cfg.CA = streamsCA
	if cfg.Serving, err = streamsCA.Ensure(pki.NodeServingRequest(name, host)); err != nil {
		return credentialsHint(err, name, host)
	}
	client, err := ca.Ensure(pki.NodeClientRequest(name))
	if err != nil {
		return credentialsHint(err, name, host)
	}
	server := n.Server
	if server == "" {
		server = "https://" + net.JoinHostPort(o.AdvertiseAddress, fmt.Sprint(o.Port))
	}
	restCfg := &rest.Config{
		Host:            server,
		TLSClientConfig: rest.TLSClientConfig{CAFile: ca.CertFile(), CertFile: client.CertFile, KeyFile: client.KeyFile},
		QPS:             200, Burst: 400,
	}
	start("node agent", true, func(ctx context.Context) error { return node.Run(ctx, restCfg, cfg) })
	return nil
}

func credentialsHint(err error, name, host string) error {
	if errors.Is(err, pki.ErrNoCAKey) {
		return fmt.Errorf("%w: on the control plane, run `hearth host credentials %s --address %s --out DIR` and copy DIR to this host's --data-dir", err, name, host)
	}
	return err
}
