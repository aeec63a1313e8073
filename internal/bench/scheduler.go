package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/hostsim"
	"hearth.dev/hearth/internal/scheduler"
)

// SchedulerOptions configure the scheduler benchmark.
type SchedulerOptions struct {
	// Hosts and Bound make the simulated cluster placement runs against;
	// Placements are timed, Baseline of them with every fitting host
	// scored.
	Hosts, Bound, Placements, Baseline int
	// APIHosts exist only as API objects; APISandboxes are bound to them
	// through the API server. Zero skips that part.
	APIHosts, APISandboxes int
	WorkDir                string
	Out                    io.Writer
	Log                    *slog.Logger
}

// SchedulerResult is what the scheduler benchmark measured.
type SchedulerResult struct {
	Hosts            int     `json:"hosts"`
	Bound            int     `json:"bound_sandboxes"`
	Placements       int     `json:"placements"`
	PlacementsPerSec float64 `json:"placements_per_sec"`
	BaselinePerSec   float64 `json:"score_all_hosts_per_sec"`
	Speedup          float64 `json:"ratio_to_score_all"`
	Target           float64 `json:"target_placements_per_sec"`
	APIHosts         int     `json:"api_hosts,omitempty"`
	APISandboxes     int     `json:"api_sandboxes,omitempty"`
	BindsPerSec      float64 `json:"api_binds_per_sec,omitempty"`
	StatusWrites     float64 `json:"api_status_writes_per_sec,omitempty"`
	RatioToWrites    float64 `json:"api_ratio_to_status_writes,omitempty"`
}

// Summary is the result in the benchmarks' common shape.
func (r *SchedulerResult) Summary() *Result {
	res := &Result{Bench: "scheduler", N: r.Placements, Details: r,
		Figure: NewFigure("placements_per_sec", r.PlacementsPerSec, "score_all_hosts_per_sec", r.BaselinePerSec, Higher, 0)}
	if r.APISandboxes > 0 {
		res.More = append(res.More, NewFigure("api_binds_per_sec", r.BindsPerSec, "api_status_writes_per_sec", r.StatusWrites, Higher, 0))
	}
	return res
}

// Scheduler measures placement alone against a large simulated cluster
// (sampling fitting hosts, against scoring them all in the same run), then
// binds through a real API server to hosts that exist only as objects.
func Scheduler(ctx context.Context, o SchedulerOptions) (*SchedulerResult, error) {
	res := &SchedulerResult{Hosts: o.Hosts, Bound: o.Bound, Placements: o.Placements, Target: 5000}
	start := time.Now()
	snap := benchSnapshot(o.Hosts, o.Bound)
	fmt.Fprintf(o.Out, "snapshot: %d hosts, %d sandboxes bound (a third with host anti-affinity, a third preferring other zones), built in %s\n",
		o.Hosts, o.Bound, time.Since(start).Round(time.Millisecond))
	rate, placed := placeAll(snap, o.Placements)
	res.PlacementsPerSec = round(rate, 0)
	fmt.Fprintf(o.Out, "placement: %d of %d placed at %.0f/s (target %.0f/s)\n", placed, o.Placements, rate, res.Target)
	all := benchSnapshot(o.Hosts, o.Bound)
	all.Sample = o.Hosts
	rate, _ = placeAll(all, o.Baseline)
	res.BaselinePerSec = round(rate, 0)
	res.Speedup = round(res.PlacementsPerSec/res.BaselinePerSec, 2)
	fmt.Fprintf(o.Out, "baseline, every fitting host scored: %d placements at %.0f/s; sampling is %.1fx faster\n", o.Baseline, rate, res.Speedup)

	if o.APIHosts > 0 && o.APISandboxes > 0 {
		if err := benchBinds(ctx, o, res); err != nil {
			return nil, err
		}
	}
	return res, nil
}

const benchApps = 1000

// benchApp is sandbox i of an app: labels app=N; apps 0 mod 3 keep their
// replicas on distinct hosts, apps 1 mod 3 prefer distinct zones.
func benchApp(app, i int) *v1alpha1.Sandbox {
	labels := map[string]string{"app": "app-" + strconv.Itoa(app)}
	sb := &v1alpha1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: fmt.Sprintf("app-%d-%d", app, i), Labels: labels},
		Spec: v1alpha1.SandboxSpec{Image: "registry.example/app:" + strconv.Itoa(app%50),
			Resources: v1alpha1.Resources{CPU: ptrQ("500m"), Memory: ptrQ("512Mi")}},
	}
	term := v1alpha1.AffinityTerm{LabelSelector: &metav1.LabelSelector{MatchLabels: labels}}
	switch app % 3 {
	case 0:
		term.TopologyKey = v1alpha1.LabelHostname
		sb.Spec.Affinity = &v1alpha1.Affinity{SandboxAntiAffinity: []v1alpha1.AffinityTerm{term}}
	case 1:
		term.TopologyKey, term.Weight = v1alpha1.LabelZone, 50
		sb.Spec.Affinity = &v1alpha1.Affinity{SandboxAntiAffinity: []v1alpha1.AffinityTerm{term}}
	}
	return sb
}

func ptrQ(s string) *resource.Quantity {
	q := resource.MustParse(s)
	return &q
}

// benchSnapshot is hosts hosts in ten zones (64 CPUs, 256 GiB, 110
// sandboxes each) carrying bound sandboxes of benchApps apps, replicas of
// an app on distinct hosts.
func benchSnapshot(hosts, bound int) *scheduler.Snapshot {
	hs := make([]*scheduler.Host, hosts)
	for i := range hs {
		hs[i] = &scheduler.Host{Name: fmt.Sprintf("host-%05d", i), Ready: true,
			Labels:      map[string]string{v1alpha1.LabelZone: "zone-" + strconv.Itoa(i%10)},
			Allocatable: scheduler.Resources{CPU: 64000, Memory: 256 << 30, Disk: 2 << 40, Sandboxes: 110}}
	}
	s := scheduler.NewSnapshot(hs, v1alpha1.PlacementSpread)
	for i := range bound {
		app, k := i%benchApps, i/benchApps
		s.Assume(benchApp(app, k), hs[(app*7919+k*101)%hosts].Name)
	}
	return s
}

// placeAll places n more replicas of the apps, one after another as a
// pass does, and returns placements per second.
func placeAll(s *scheduler.Snapshot, n int) (float64, int) {
	r := rand.New(rand.NewPCG(1, 2))
	sbs := make([]*v1alpha1.Sandbox, n)
	for i := range sbs {
		sbs[i] = benchApp(r.IntN(benchApps), 1000+i)
	}
	placed := 0
	start := time.Now()
	for _, sb := range sbs {
		if d := s.Place(sb); d.Host != "" {
			s.Assume(sb, d.Host)
			placed++
		}
	}
	return float64(n) / time.Since(start).Seconds(), placed
}

// benchBinds binds sandboxes through the API server to hosts that exist
// only as API objects: the sandboxes and hosts are created first, then a
// scheduler starts and binds them all; against status writes of the same
// sandboxes with as many writers, in the same run.
func benchBinds(ctx context.Context, o SchedulerOptions, res *SchedulerResult) error {
	h, err := startHearth(ctx, o.Log, o.WorkDir, func(opts *hearthd.Options) { opts.Controllers.Disabled = true })
	if err != nil {
		return err
	}
	defer h.stop()
	c := h.client
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}); err != nil {
		return err
	}
	sim, err := hostsim.Start(ctx, hostsim.Options{Client: c, Hosts: o.APIHosts, Prefix: "sim",
		Allocatable: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("64"), corev1.ResourceMemory: resource.MustParse("256Gi"),
			v1alpha1.ResourceSandboxes: resource.MustParse("110")},
		Labels: func(i int) map[string]string {
			return map[string]string{v1alpha1.LabelZone: "zone-" + strconv.Itoa(i%10)}
		}})
	if err != nil {
		return err
	}
	defer sim.Stop()
	n := o.APISandboxes
	if _, err := parallel(ctx, n, 32, func(i int) error { return c.Create(ctx, benchApp(i%benchApps, i/benchApps)) }); err != nil {
		return fmt.Errorf("create sandboxes: %w", err)
	}
	fmt.Fprintf(o.Out, "API: %d hosts and %d pending sandboxes created; starting the scheduler\n", o.APIHosts, n)

	mgr, err := ctrl.NewManager(h.cfg, ctrl.Options{Scheme: hearthd.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0", Logger: ctrl.Log})
	if err != nil {
		return err
	}
	sched := &scheduler.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-scheduler"), Log: o.Log}
	if err := sched.SetupWithManager(mgr); err != nil {
		return err
	}
	mctx, stop := context.WithCancel(ctx)
	defer stop()
	start := time.Now()
	go func() { _ = mgr.Start(mctx) }()
	if !mgr.GetCache().WaitForCacheSync(mctx) {
		return fmt.Errorf("scheduler cache did not sync")
	}
	for {
		var list v1alpha1.SandboxList
		if err := mgr.GetCache().List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
			return err
		}
		bound := 0
		for _, sb := range list.Items {
			if sb.Status.HostName != "" {
				bound++
			}
		}
		if bound == n {
			break
		}
		if time.Since(start) > 5*time.Minute {
			return fmt.Errorf("%d of %d sandboxes bound after 5 minutes", bound, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	d := time.Since(start)
	stop()
	res.APIHosts, res.APISandboxes = o.APIHosts, n
	res.BindsPerSec = round(float64(n)/d.Seconds(), 0)
	fmt.Fprintf(o.Out, "API: %d sandboxes bound to %d API-only hosts in %s: %.0f binds/s\n", n, o.APIHosts, d.Round(time.Millisecond), res.BindsPerSec)

	// The ceiling: as many status writes, of the same objects, 16 at once
	// as the scheduler writes them.
	var list v1alpha1.SandboxList
	if err := c.List(ctx, &list, client.InNamespace("bench")); err != nil {
		return err
	}
	d, err = parallel(ctx, len(list.Items), 16, func(i int) error {
		sb := &list.Items[i]
		patch := client.MergeFrom(sb.DeepCopy())
		sb.Status.Message = "bench"
		return c.Status().Patch(ctx, sb, patch)
	})
	if err != nil {
		return err
	}
	res.StatusWrites = round(float64(len(list.Items))/d.Seconds(), 0)
	res.RatioToWrites = round(res.BindsPerSec/res.StatusWrites, 3)
	fmt.Fprintf(o.Out, "API: %d plain status writes at %.0f/s; binding runs at %.0f%% of that\n", len(list.Items), res.StatusWrites, 100*res.RatioToWrites)
	return nil
}
