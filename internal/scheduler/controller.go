package scheduler

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
)

// Controller binds sandboxes. Every change to a sandbox or host triggers
// one pass over all pending sandboxes: a pass sees the whole cluster, so
// freed capacity is reused at once and the oldest pending sandbox goes
// first. A host is ready by its Ready condition, which the host lifecycle
// controller keeps in line with its heartbeats (a lapse is a Host event).
type Controller struct {
	Client   client.Client
	Recorder record.EventRecorder
	Log      *slog.Logger
	// Policy is the default placement (Spread unless set).
	Policy v1alpha1.Placement

	mu sync.Mutex
	// assumed are bindings written but not yet seen in the cache, so that
	// the next pass does not count their host as emptier than it is.
	assumed map[types.UID]assumption
	// reported are the Unschedulable reports written in the last pass
	// (and those carried over): the resourceVersion each was written from.
	// While the cache still shows a sandbox at that version it has not
	// caught up with the write, and writing again from it could only
	// conflict; its watch event starts the pass that sees it.
	reported map[types.UID]string
}

type assumption struct {
	host string
	sb   *v1alpha1.Sandbox
}

var passKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "pass"}}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	c.assumed = map[types.UID]assumption{}
	c.reported = map[types.UID]string{}
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{passKey}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("scheduler").
		Watches(&v1alpha1.Sandbox{}, all).
		Watches(&v1alpha1.Host{}, all).
		Watches(&v1alpha1.Migration{}, all).
		Complete(c)
}

// Reconcile runs one scheduling pass: placements are decided in memory,
// oldest sandbox first, then written concurrently, bindings before the
// reports of sandboxes that fit nowhere.
func (c *Controller) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	// The cache's objects, not copies: a pass reads thousands of them and
	// copies only the few it writes.
	var sbs v1alpha1.SandboxList
	if err := c.Client.List(ctx, &sbs, client.UnsafeDisableDeepCopy); err != nil {
		return reconcile.Result{}, err
	}
	var hostList v1alpha1.HostList
	if err := c.Client.List(ctx, &hostList); err != nil {
		return reconcile.Result{}, err
	}
	var moves v1alpha1.MigrationList
	if err := c.Client.List(ctx, &moves, client.UnsafeDisableDeepCopy); err != nil {
		return reconcile.Result{}, err
	}
	snap := c.snapshot(hostList.Items, sbs.Items, moves.Items)
	c.mu.Lock()
	reported := c.reported
	c.reported = make(map[types.UID]string, len(reported))
	c.mu.Unlock()

	var pending, release []*v1alpha1.Sandbox
	for i := range sbs.Items {
		sb := &sbs.Items[i]
		switch {
		case sb.Status.HostName != "":
		case !sb.DeletionTimestamp.IsZero():
			// Never bound: nothing on any host to clean up.
			if controllerutil.ContainsFinalizer(sb, v1alpha1.Finalizer) {
				release = append(release, sb)
			}
		case sb.ClaimsWarmPool():
			// Bound by the warm pool controller to the host of the
			// pool's sandbox it takes.
		default:
			if rv, ok := reported[sb.UID]; ok && rv == sb.ResourceVersion {
				// Not written again before the cache shows the last write.
				c.mu.Lock()
				c.reported[sb.UID] = rv
				c.mu.Unlock()
				continue
			}
			if !c.isAssumed(sb.UID) {
				pending = append(pending, sb)
			}
		}
	}
	sort.SliceStable(pending, func(i, j int) bool {
		return pending[i].CreationTimestamp.Before(&pending[j].CreationTimestamp)
	})
	type decision struct {
		sb        *v1alpha1.Sandbox
		host, why string
	}
	var binds, waits []decision
	// Sandboxes alike (same requests and constraints, no affinity) that
	// found no host in this pass will not find one later in it: capacity
	// only shrinks as the pass goes.
	failed := map[string]string{}
	for _, sb := range pending {
		key := equivalence(sb)
		why, known := failed[key]
		if !known || key == "" {
			d := snap.Place(sb)
			if d.Host != "" {
				snap.Assume(sb, d.Host)
				binds = append(binds, decision{sb, d.Host, ""})
				continue
			}
			why = d.Reason
			if key != "" {
				failed[key] = why
			}
		}
		if sb.Status.Phase != v1alpha1.PhasePending || sb.Status.Reason != "Unschedulable" || sb.Status.Message != why {
			waits = append(waits, decision{sb, "", why})
		}
	}
	var retry atomic.Bool
	write := func(ds []decision) error {
		return forEach(ctx, len(ds), func(i int) error {
			err := c.bind(ctx, ds[i].sb.DeepCopy(), ds[i].host, ds[i].why)
			if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
				retry.Store(true)
				return nil
			}
			if err == nil && ds[i].host == "" {
				c.mu.Lock()
				c.reported[ds[i].sb.UID] = ds[i].sb.ResourceVersion
				c.mu.Unlock()
			}
			return err
		})
	}
	if err := write(binds); err != nil {
		return reconcile.Result{}, err
	}
	if err := write(waits); err != nil {
		return reconcile.Result{}, err
	}
	if err := forEach(ctx, len(release), func(i int) error {
		sb := release[i].DeepCopy()
		controllerutil.RemoveFinalizer(sb, v1alpha1.Finalizer)
		return client.IgnoreNotFound(c.Client.Update(ctx, sb))
	}); err != nil {
		return reconcile.Result{}, err
	}
	return reconcile.Result{Requeue: retry.Load()}, nil
}

// forEach runs f(0..n-1) on up to 16 goroutines and returns the first error.
func forEach(ctx context.Context, n int, f func(int) error) error {
	g, _ := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range n {
		g.Go(func() error { return f(i) })
	}
	return g.Wait()
}

// equivalence is a key shared by sandboxes that fit the same hosts, or ""
// for those with affinity terms (which depend on their labels).
func equivalence(sb *v1alpha1.Sandbox) string {
	if sb.Spec.Affinity != nil {
		return ""
	}
	r := Requests(sb)
	var needs string
	if src := sb.Spec.Source; src != nil {
		needs = src.Snapshot // a host that holds it (query.needs)
	}
	return fmt.Sprintf("%s|%v|%v|%v|%s|%s|%s", sb.Namespace, r, sb.Spec.HostSelector, sb.Spec.Tolerations, sb.Spec.Placement,
		sb.Spec.Isolation, needs)
}

// snapshot builds the cluster as placement sees it, counting what is
// bound and what was just bound.
// A sandbox migrating in takes room on its target before it is bound
// there (it counts on its source too, until then).
func (c *Controller) snapshot(hostItems []v1alpha1.Host, sbs []v1alpha1.Sandbox, moves []v1alpha1.Migration) *Snapshot {
	hosts := make([]*Host, 0, len(hostItems))
	for i := range hostItems {
		h := &hostItems[i]
		hosts = append(hosts, HostFrom(h, meta.IsStatusConditionTrue(h.Status.Conditions, v1alpha1.HostConditionReady)))
	}
	snap := NewSnapshot(hosts, c.Policy)
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range sbs {
		sb := &sbs[i]
		if sb.Status.HostName != "" {
			delete(c.assumed, sb.UID)
			if !sb.Status.Phase.Terminal() {
				snap.Assume(sb, sb.Status.HostName)
			}
		}
	}
	for _, a := range c.assumed {
		snap.Assume(a.sb, a.host)
	}
	if len(moves) > 0 {
		byUID := make(map[types.UID]*v1alpha1.Sandbox, len(sbs))
		for i := range sbs {
			byUID[sbs[i].UID] = &sbs[i]
		}
		for i := range moves {
			m := &moves[i]
			if sb := byUID[m.Status.SandboxUID]; m.InFlight() && sb != nil && !sb.Status.Phase.Terminal() && sb.Status.HostName != m.Status.TargetHost {
				snap.Assume(sb, m.Status.TargetHost)
			}
		}
	}
	return snap
}

// isAssumed reports whether uid was bound in an earlier pass that the
// cache has not caught up with.
func (c *Controller) isAssumed(uid types.UID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.assumed[uid]
	return ok
}

// bind writes the placement (or why there is none) to the sandbox. The
// finalizer is on it from its creation (the API server's admission).
func (c *Controller) bind(ctx context.Context, sb *v1alpha1.Sandbox, hostName, why string) error {
	now := metav1.Now()
	if hostName == "" {
		sb.Status.Phase, sb.Status.Reason, sb.Status.Message = v1alpha1.PhasePending, "Unschedulable", why
		meta.SetStatusCondition(&sb.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionScheduled,
			Status: metav1.ConditionFalse, Reason: "Unschedulable", Message: why, LastTransitionTime: now})
		return c.Client.Status().Update(ctx, sb)
	}
	sb.Status.HostName, sb.Status.Phase, sb.Status.Reason, sb.Status.Message = hostName, v1alpha1.PhaseScheduled, "", ""
	meta.SetStatusCondition(&sb.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionScheduled,
		Status: metav1.ConditionTrue, Reason: "Scheduled", Message: "bound to " + hostName, LastTransitionTime: now})
	if err := c.Client.Status().Update(ctx, sb); err != nil {
		return err
	}
	c.mu.Lock()
	c.assumed[sb.UID] = assumption{host: hostName, sb: sb}
	c.mu.Unlock()
	if c.Recorder != nil {
		c.Recorder.Eventf(sb, corev1.EventTypeNormal, "Scheduled", "Bound to host %s", hostName)
	}
	c.Log.Debug("bound", "sandbox", fmt.Sprintf("%s/%s", sb.Namespace, sb.Name), "host", hostName)
	return nil
}
