package bench

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
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
	ports, err := freePorts(4)
	if err != nil {
		return nil, err
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
	go func() {
		err := hearthd.Run(ctx, log, opts, func(kc string) { ready <- kc })
		if ctx.Err() == nil {
			// Not stopped by the benchmark: what it measures next fails
			// (connection refused), and this says why.
			log.Error("the benchmark's hearthd stopped", "err", err)
		}
		done <- err
	}()
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

// freePorts returns n distinct free loopback ports: each is held until
// all are found, so that none is handed out twice.
func freePorts(n int) ([]int, error) {
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}

// createRunning creates sb and waits through a watch (polling would load
// the machine that boots the VM) until it is Running, returning it as then
// and when it was created (just before the create call). It fails when the sandbox ends or timeout
// passes. A watch the server closes (as it may under load) is opened
// again from the sandbox's state at that point.
func createRunning(ctx context.Context, c client.WithWatch, sb *v1alpha1.Sandbox, timeout time.Duration) (*v1alpha1.Sandbox, time.Time, error) {
	open := func(rv string) (watch.Interface, error) {
		return c.Watch(ctx, &v1alpha1.SandboxList{}, client.InNamespace(sb.Namespace), client.MatchingFields{"metadata.name": sb.Name},
			&client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: rv}})
	}
	w, err := open("")
	if err != nil {
		return sb, time.Time{}, err
	}
	defer func() { w.Stop() }()
	start := time.Now()
	if err := c.Create(ctx, sb); err != nil {
		return sb, time.Time{}, err
	}
	deadline := time.After(timeout)
	for sb.Status.Phase != v1alpha1.PhaseRunning {
		if sb.Status.Phase.Terminal() {
			return sb, start, fmt.Errorf("sandbox %s ended %s: %s", sb.Name, sb.Status.Reason, sb.Status.Message)
		}
		select {
		case ev, ok := <-w.ResultChan():
			if got, isSB := ev.Object.(*v1alpha1.Sandbox); ok && isSB {
				sb = got
				continue
			}
			// Closed, or an error event: look, and watch again from there.
			w.Stop()
			cur := &v1alpha1.Sandbox{}
			if err := c.Get(ctx, client.ObjectKeyFromObject(sb), cur); err != nil {
				return sb, start, fmt.Errorf("sandbox %s: %w", sb.Name, err)
			}
			sb = cur
			if w, err = open(sb.ResourceVersion); err != nil {
				return sb, start, err
			}
		case <-deadline:
			return sb, start, fmt.Errorf("sandbox %s is %s after %s: %s", sb.Name, sb.Status.Phase, timeout, sb.Status.Message)
		case <-ctx.Done():
			return sb, start, ctx.Err()
		}
	}
	return sb, start, nil
}
