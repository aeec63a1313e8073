package scheduler

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
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

// LeaseTimeout is how long a host's lease may go unrenewed before the
// scheduler stops placing sandboxes on it.
const LeaseTimeout = 40 * time.Second

// Controller binds sandboxes. Every change to a sandbox, host or host
// lease triggers one pass over all pending sandboxes: a pass sees the
// whole cluster, so freed capacity is reused at once and the oldest
// pending sandbox goes first.
type Controller struct {
	Client   client.Client
	Recorder record.EventRecorder
	Log      *slog.Logger

	mu sync.Mutex
	// assumed are bindings written but not yet seen in the cache, so that
	// the next pass does not count their host as emptier than it is.
	assumed map[types.UID]assumption
}

type assumption struct {
	host string
	req  corev1.ResourceList
}

var passKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "pass"}}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	c.assumed = map[types.UID]assumption{}
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{passKey}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("scheduler").
		Watches(&v1alpha1.Sandbox{}, all).
		Watches(&v1alpha1.Host{}, all).
		Watches(&coordinationv1.Lease{}, all).
		Complete(c)
}

// Reconcile runs one scheduling pass.
func (c *Controller) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	var sbs v1alpha1.SandboxList
	if err := c.Client.List(ctx, &sbs); err != nil {
		return reconcile.Result{}, err
	}
	var hostList v1alpha1.HostList
	if err := c.Client.List(ctx, &hostList); err != nil {
		return reconcile.Result{}, err
	}
	var leases coordinationv1.LeaseList
	if err := c.Client.List(ctx, &leases, client.InNamespace(v1alpha1.LeaseNamespace)); err != nil {
		return reconcile.Result{}, err
	}
	hosts, byName := c.snapshot(hostList.Items, leases.Items, sbs.Items)

	var pending []*v1alpha1.Sandbox
	for i := range sbs.Items {
		sb := &sbs.Items[i]
		if sb.Status.HostName != "" {
			continue
		}
		if !sb.DeletionTimestamp.IsZero() {
			// Never bound: nothing on any host to clean up.
			if controllerutil.RemoveFinalizer(sb, v1alpha1.Finalizer) {
				if err := c.Client.Update(ctx, sb); err != nil && !apierrors.IsNotFound(err) {
					return reconcile.Result{}, err
				}
			}
			continue
		}
		if _, ok := c.assumedHost(sb.UID); ok {
			continue
		}
		pending = append(pending, sb)
	}
	sort.SliceStable(pending, func(i, j int) bool {
		return pending[i].CreationTimestamp.Before(&pending[j].CreationTimestamp)
	})
	var retry bool
	for _, sb := range pending {
		name, why := Place(hosts, sb)
		if err := c.bind(ctx, sb, name, why); err != nil {
			if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
				retry = true
				continue
			}
			return reconcile.Result{}, err
		}
		if name != "" {
			Add(byName[name].Used, Requests(sb))
		}
	}
	// Hosts' leases expire without an event: look again while any host is
	// ready, so that a silent host is noticed.
	return reconcile.Result{Requeue: retry, RequeueAfter: LeaseTimeout / 2}, nil
}

// snapshot builds the hosts as placement sees them, counting what is
// bound and what was just bound.
func (c *Controller) snapshot(hostItems []v1alpha1.Host, leases []coordinationv1.Lease, sbs []v1alpha1.Sandbox) ([]*HostInfo, map[string]*HostInfo) {
	renewed := map[string]time.Time{}
	for _, l := range leases {
		if l.Spec.RenewTime != nil {
			renewed[l.Name] = l.Spec.RenewTime.Time
		}
	}
	byName := map[string]*HostInfo{}
	hosts := make([]*HostInfo, 0, len(hostItems))
	for i := range hostItems {
		h := &hostItems[i]
		ready := meta.IsStatusConditionTrue(h.Status.Conditions, v1alpha1.HostConditionReady) &&
			time.Since(renewed[h.Name]) < LeaseTimeout
		hi := &HostInfo{Name: h.Name, Labels: h.Labels, Ready: ready, Cordoned: h.Spec.Unschedulable,
			Allocatable: h.Status.Allocatable, Used: corev1.ResourceList{}}
		hosts = append(hosts, hi)
		byName[h.Name] = hi
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range sbs {
		sb := &sbs[i]
		if sb.Status.HostName != "" {
			delete(c.assumed, sb.UID)
			if h := byName[sb.Status.HostName]; h != nil && !sb.Status.Phase.Terminal() {
				Add(h.Used, Requests(sb))
			}
		}
	}
	for _, a := range c.assumed {
		if h := byName[a.host]; h != nil {
			Add(h.Used, a.req)
		}
	}
	return hosts, byName
}

func (c *Controller) assumedHost(uid types.UID) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.assumed[uid]
	return a.host, ok
}

// bind writes the placement (or why there is none) to the sandbox.
func (c *Controller) bind(ctx context.Context, sb *v1alpha1.Sandbox, hostName, why string) error {
	if controllerutil.AddFinalizer(sb, v1alpha1.Finalizer) {
		if err := c.Client.Update(ctx, sb); err != nil {
			return err
		}
	}
	now := metav1.Now()
	if hostName == "" {
		if sb.Status.Phase == v1alpha1.PhasePending && sb.Status.Reason == "Unschedulable" && sb.Status.Message == why {
			return nil
		}
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
	c.assumed[sb.UID] = assumption{host: hostName, req: Requests(sb)}
	c.mu.Unlock()
	if c.Recorder != nil {
		c.Recorder.Eventf(sb, corev1.EventTypeNormal, "Scheduled", "Bound to host %s", hostName)
	}
	c.Log.Debug("bound", "sandbox", fmt.Sprintf("%s/%s", sb.Namespace, sb.Name), "host", hostName)
	return nil
}
