// Package hostlifecycle watches hosts' heartbeats, as Kubernetes' node
// lifecycle controller does: a host whose Lease goes unrenewed for Timeout
// is marked NotReady (the scheduler then places nothing there); one that
// stays NotReady for LostAfter loses its sandboxes, which are placed again
// on other hosts as their restartPolicy says (a started sandbox with
// restartPolicy Never ends Failed instead). A host that heartbeats again
// is Ready again; its agent stops the copies it still runs of sandboxes
// that moved (internal/node's garbage collection).
package hostlifecycle

import (
	"context"
	"fmt"
	"log/slog"
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

// Defaults: a host is NotReady after 40 s without a heartbeat (four missed
// renewals) and lost after 5 minutes of that, as Kubernetes' defaults.
const (
	DefaultTimeout   = 40 * time.Second
	DefaultLostAfter = 5 * time.Minute
)

// Reasons of the Ready condition this controller writes.
const (
	ReasonLapsed  = "HeartbeatLapsed"
	ReasonResumed = "HeartbeatResumed"
)

// HostNameField indexes sandboxes by status.hostName in the cache.
const HostNameField = "status.hostName"

// Controller keeps hosts' Ready condition in line with their heartbeats
// and moves the sandboxes of lost hosts.
type Controller struct {
	Client    client.Client
	Recorder  record.EventRecorder
	Log       *slog.Logger
	Timeout   time.Duration
	LostAfter time.Duration
	// Now is time.Now unless set (tests).
	Now func() time.Time
}

// SetupWithManager registers the controller and the sandbox index it uses.
func (c *Controller) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.LostAfter == 0 {
		c.LostAfter = DefaultLostAfter
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if err := mgr.GetFieldIndexer().IndexField(ctx, &v1alpha1.Sandbox{}, HostNameField, func(o client.Object) []string {
		if h := o.(*v1alpha1.Sandbox).Status.HostName; h != "" {
			return []string{h}
		}
		return nil
	}); err != nil {
		return err
	}
	byLeaseName := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		if o.GetNamespace() != v1alpha1.LeaseNamespace {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: o.GetName()}}}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("hostlifecycle").
		For(&v1alpha1.Host{}).
		Watches(&coordinationv1.Lease{}, byLeaseName).
		Complete(c)
}

// Reconcile checks one host's heartbeat.
func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	now := c.Now()
	var h v1alpha1.Host
	if err := c.Client.Get(ctx, req.NamespacedName, &h); apierrors.IsNotFound(err) {
		// The host was removed from the cluster: what was bound to it has
		// nowhere to run.
		return reconcile.Result{}, c.moveSandboxes(ctx, req.Name, "was removed from the cluster")
	} else if err != nil {
		return reconcile.Result{}, err
	}
	renewed := h.CreationTimestamp.Time
	var l coordinationv1.Lease
	err := c.Client.Get(ctx, types.NamespacedName{Namespace: v1alpha1.LeaseNamespace, Name: h.Name}, &l)
	if err != nil && !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	if err == nil && l.Spec.RenewTime != nil {
		renewed = l.Spec.RenewTime.Time
	}
	silent := now.Sub(renewed)
	ready := meta.FindStatusCondition(h.Status.Conditions, v1alpha1.HostConditionReady)

	if silent < c.Timeout {
		if ready != nil && ready.Status != metav1.ConditionTrue && ready.Reason == ReasonLapsed {
			meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReady,
				Status: metav1.ConditionTrue, Reason: ReasonResumed, Message: "the node agent heartbeats again"})
			if err := c.Client.Status().Update(ctx, &h); err != nil {
				return reconcile.Result{}, err
			}
			c.Log.Info("host ready again", "host", h.Name)
			c.Recorder.Event(&h, corev1.EventTypeNormal, ReasonResumed, "The node agent heartbeats again")
		}
		return reconcile.Result{RequeueAfter: c.Timeout - silent + 100*time.Millisecond}, nil
	}

	if ready == nil || ready.Status == metav1.ConditionTrue {
		msg := fmt.Sprintf("no heartbeat since %s", renewed.UTC().Format(time.RFC3339))
		meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1alpha1.HostConditionReady,
			Status: metav1.ConditionFalse, Reason: ReasonLapsed, Message: msg, LastTransitionTime: metav1.NewTime(now)})
		if err := c.Client.Status().Update(ctx, &h); err != nil {
			return reconcile.Result{}, err
		}
		c.Log.Warn("host not ready", "host", h.Name, "silent", silent.Round(time.Second))
		c.Recorder.Event(&h, corev1.EventTypeWarning, ReasonLapsed, "Host is not ready: "+msg)
		return reconcile.Result{RequeueAfter: c.LostAfter}, nil
	}
	notReadyFor := now.Sub(ready.LastTransitionTime.Time)
	if notReadyFor < c.LostAfter {
		return reconcile.Result{RequeueAfter: c.LostAfter - notReadyFor + 100*time.Millisecond}, nil
	}
	if err := c.moveSandboxes(ctx, h.Name, fmt.Sprintf("stopped responding %s ago", silent.Round(time.Second))); err != nil {
		return reconcile.Result{}, err
	}
	// Sandboxes may still be bound to it by a scheduler that had not yet
	// seen it go: look again while it stays silent.
	return reconcile.Result{RequeueAfter: c.Timeout}, nil
}

// moveSandboxes gives the sandboxes bound to a lost host back to the
// scheduler, or ends them as their restart policy says, and lets those
// being deleted go (nothing on the host can be reached to clean up; its
// agent removes the leftovers if it returns).
func (c *Controller) moveSandboxes(ctx context.Context, host, why string) error {
	var list v1alpha1.SandboxList
	if err := c.Client.List(ctx, &list, client.MatchingFields{HostNameField: host}); err != nil {
		return err
	}
	for i := range list.Items {
		sb := &list.Items[i]
		if sb.Status.HostName != host {
			continue
		}
		if !sb.DeletionTimestamp.IsZero() {
			if controllerutil.RemoveFinalizer(sb, v1alpha1.Finalizer) {
				if err := c.Client.Update(ctx, sb); client.IgnoreNotFound(err) != nil {
					return err
				}
			}
			continue
		}
		if sb.Status.Phase.Terminal() {
			continue
		}
		msg := fmt.Sprintf("host %s %s", host, why)
		if sb.Spec.RestartPolicy == v1alpha1.RestartNever && sb.Status.StartedAt != nil {
			lose(sb, msg)
			c.Recorder.Event(sb, corev1.EventTypeWarning, "HostLost", msg+"; the sandbox failed (restartPolicy Never)")
		} else {
			sb.Status.Unbind("HostLost", msg+"; placing the sandbox again")
			c.Recorder.Event(sb, corev1.EventTypeWarning, "HostLost", msg+"; placing the sandbox again")
		}
		if err := c.Client.Status().Update(ctx, sb); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return err
		}
		c.Log.Info("sandbox of a lost host", "sandbox", sb.Namespace+"/"+sb.Name, "host", host, "phase", sb.Status.Phase)
	}
	return nil
}

// lose ends a sandbox that cannot run again: Failed, HostLost.
func lose(sb *v1alpha1.Sandbox, msg string) {
	now := metav1.Now()
	st := &sb.Status
	st.Phase, st.Reason, st.Message, st.FinishedAt = v1alpha1.PhaseFailed, "HostLost", msg, &now
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady, Status: metav1.ConditionFalse,
		Reason: "HostLost", Message: msg, LastTransitionTime: now})
}
