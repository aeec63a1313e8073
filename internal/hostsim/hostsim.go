// Package hostsim simulates hosts that exist only as API objects, as
// Kubernetes' kubemark does with hollow nodes: each registers a Host,
// heartbeats through its Lease, and optionally "runs" the sandboxes bound
// to it (Running, then Succeeded after a while) without booting anything.
// It measures the control plane at a scale one machine cannot boot VMs
// for (hearth bench scheduler), and checks the scheduler's invariants
// under load: no sandbox started twice or on two hosts, no host running
// more than it has room for.
package hostsim

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"golang.org/x/sync/errgroup"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/node"
)

// Options say which hosts to simulate.
type Options struct {
	Client client.WithWatch
	// Hosts is how many; they are named Prefix-0, Prefix-1, ...
	Hosts  int
	Prefix string
	// Allocatable of each host.
	Allocatable corev1.ResourceList
	// Labels of host i, or nil.
	Labels func(i int) map[string]string
	// RunFor: each bound sandbox runs this long, then succeeds; zero
	// leaves bound sandboxes alone.
	RunFor time.Duration
	// Heartbeat is how often leases are renewed (10 s unless set).
	Heartbeat time.Duration
}

// Sim is a set of simulated hosts.
type Sim struct {
	o      Options
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	capacity map[string]int64
	running  map[string]int64
	ranOn    map[string][]string // sandbox uid -> hosts it started on
	problems []string
	finished int
}

// Start registers the hosts and keeps them alive until Stop.
func Start(ctx context.Context, o Options) (*Sim, error) {
	if o.Heartbeat == 0 {
		o.Heartbeat = 10 * time.Second
	}
	s := &Sim{o: o, capacity: map[string]int64{}, running: map[string]int64{}, ranOn: map[string][]string{}, done: make(chan struct{})}
	sandboxes := o.Allocatable[v1alpha1.ResourceSandboxes]
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for i := range o.Hosts {
		name := fmt.Sprintf("%s-%d", o.Prefix, i)
		s.capacity[name] = sandboxes.Value()
		g.Go(func() error { return s.register(gctx, name, i) })
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	ctx, s.cancel = context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.heartbeat(ctx) }()
	if o.RunFor > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); s.run(ctx) }()
	}
	go func() { wg.Wait(); close(s.done) }()
	return s, nil
}

// Stop stops heartbeating and running.
func (s *Sim) Stop() {
	s.cancel()
	<-s.done
}

func (s *Sim) register(ctx context.Context, name string, i int) error {
	h := &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if s.o.Labels != nil {
		h.Labels = s.o.Labels(i)
	}
	if err := s.o.Client.Create(ctx, h); err != nil {
		return fmt.Errorf("create host %s: %w", name, err)
	}
	// A merge patch, not an update: the control plane's hostranges
	// controller writes the new Host's sandbox range at the same time, and
	// an update from the created object's version would conflict with it.
	base := h.DeepCopy()
	h.Status.Capacity, h.Status.Allocatable, h.Status.Accel = s.o.Allocatable, s.o.Allocatable, "simulated"
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReady, Status: metav1.ConditionTrue,
		Reason: "Simulated", Message: "a simulated host (hostsim)"})
	if err := s.o.Client.Status().Patch(ctx, h, client.MergeFrom(base)); err != nil {
		return fmt.Errorf("host %s status: %w", name, err)
	}
	return s.renew(ctx, name)
}

func (s *Sim) renew(ctx context.Context, name string) error {
	return node.RenewLease(ctx, s.o.Client, name, s.o.Heartbeat)
}

func (s *Sim) heartbeat(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.o.Heartbeat):
		}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(16)
		for i := range s.o.Hosts {
			g.Go(func() error {
				_ = s.renew(gctx, fmt.Sprintf("%s-%d", s.o.Prefix, i))
				return nil
			})
		}
		_ = g.Wait()
	}
}

// run starts each sandbox bound to a simulated host, once, and ends it
// RunFor later.
func (s *Sim) run(ctx context.Context) {
	for ctx.Err() == nil {
		w, err := s.o.Client.Watch(ctx, &v1alpha1.SandboxList{})
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		for ev := range w.ResultChan() {
			sb, ok := ev.Object.(*v1alpha1.Sandbox)
			if !ok || (ev.Type != watch.Added && ev.Type != watch.Modified) {
				continue
			}
			if !sb.DeletionTimestamp.IsZero() {
				s.release(ctx, sb)
				continue
			}
			if sb.Status.Phase == v1alpha1.PhaseScheduled && s.start(sb) {
				go s.finish(ctx, sb)
			}
		}
		w.Stop()
	}
}

// release lets a deleted sandbox of a simulated host go, as its node
// agent would once its VM was gone.
func (s *Sim) release(ctx context.Context, sb *v1alpha1.Sandbox) {
	s.mu.Lock()
	_, ours := s.capacity[sb.Status.HostName]
	s.mu.Unlock()
	if ours && controllerutil.RemoveFinalizer(sb, v1alpha1.Finalizer) {
		_ = s.o.Client.Update(ctx, sb)
	}
}

// start records that sb starts on its host, and whether this is news.
func (s *Sim) start(sb *v1alpha1.Sandbox) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	host, uid := sb.Status.HostName, string(sb.UID)
	capacity, ours := s.capacity[host]
	if !ours {
		return false
	}
	for _, h := range s.ranOn[uid] {
		if h == host {
			return false // an event of a start already made
		}
	}
	if len(s.ranOn[uid]) > 0 {
		s.problems = append(s.problems, fmt.Sprintf("sandbox %s started on %s after %v", sb.Name, host, s.ranOn[uid]))
	}
	s.ranOn[uid] = append(s.ranOn[uid], host)
	s.running[host]++
	if capacity > 0 && s.running[host] > capacity {
		s.problems = append(s.problems, fmt.Sprintf("host %s runs %d sandboxes, room for %d", host, s.running[host], capacity))
	}
	return true
}

func (s *Sim) finish(ctx context.Context, sb *v1alpha1.Sandbox) {
	setPhase := func(p v1alpha1.Phase) error {
		patch := client.MergeFrom(sb.DeepCopy())
		sb.Status.Phase = p
		now := metav1.Now()
		if p == v1alpha1.PhaseRunning {
			sb.Status.StartedAt = &now
		} else {
			sb.Status.FinishedAt, sb.Status.ExitCode, sb.Status.Reason = &now, ptr.To[int32](0), "Completed"
		}
		return s.o.Client.Status().Patch(ctx, sb, patch)
	}
	if setPhase(v1alpha1.PhaseRunning) != nil {
		return
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(s.o.RunFor):
	}
	// Room is freed before the scheduler can see it freed.
	s.mu.Lock()
	s.running[sb.Status.HostName]--
	s.finished++
	s.mu.Unlock()
	for ctx.Err() == nil && setPhase(v1alpha1.PhaseSucceeded) != nil {
		time.Sleep(50 * time.Millisecond)
	}
}

// Report is what the simulated hosts saw.
type Report struct {
	// Started and Finished count sandboxes.
	Started, Finished int
	// Problems are broken invariants: a sandbox started twice or on two
	// hosts, a host over its sandbox count.
	Problems []string
}

// Report says what happened so far.
func (s *Sim) Report() Report {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Report{Started: len(s.ranOn), Finished: s.finished, Problems: append([]string(nil), s.problems...)}
}
