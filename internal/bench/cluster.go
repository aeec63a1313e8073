package bench

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/internal/hearthd"
)

// hearth is a hearthd run in this process by a benchmark, with a data
// directory and ports of its own.
type hearth struct {
	client   client.WithWatch
	cfg      *rest.Config
	dataDir  string
	etcdPort int
	stop     func()
}

// startHearth starts a control plane (adjust may add roles or change
// options) and returns a client with no client-side rate limit.
func startHearth(ctx context.Context, log *slog.Logger, workDir string, adjust func(*hearthd.Options)) (*hearth, error) {
	ports := make([]int, 4)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	dataDir := filepath.Join(workDir, "d")
	opts := hearthd.DefaultOptions()
	opts.DataDir, opts.Roles, opts.BindAddress, opts.Version = dataDir, []string{hearthd.RoleControlPlane}, "127.0.0.1", "bench"
	opts.Port, opts.EtcdClientPort, opts.EtcdPeerPort = ports[0], ports[1], ports[2]
	opts.Node.Listen = fmt.Sprintf("127.0.0.1:%d", ports[3])
	// Sandboxes of a benchmark get no network: this machine's own network
	// namespace is not the benchmark's to change (bench ingress and policy
	// measure the network in namespaces of their own).
	opts.Node.Network = false
	if adjust != nil {
		adjust(&opts)
	}
	ctx, cancel := context.WithCancel(ctx)
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() { done <- hearthd.Run(ctx, log, opts, func(kc string) { ready <- kc }) }()
	stop := func() {
		cancel()
		<-done
	}
	var kubeconfig string
	select {
	case kubeconfig = <-ready:
	case err := <-done:
		cancel()
		return nil, fmt.Errorf("hearth did not start: %w", err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		stop()
		return nil, err
	}
	cfg.QPS, cfg.Burst = -1, 0 // no client-side rate limit
	c, err := client.NewWithWatch(cfg, client.Options{Scheme: hearthd.Scheme})
	if err != nil {
		stop()
		return nil, err
	}
	return &hearth{client: c, cfg: cfg, dataDir: dataDir, etcdPort: ports[1], stop: stop}, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
