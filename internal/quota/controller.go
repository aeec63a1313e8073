package quota

import (
	"context"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
	quotav1 "k8s.io/apiserver/pkg/quota/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
)

// Controller keeps each ResourceQuota's status: hard as its spec says,
// used as the namespace's objects add up to, plus what admission charged
// in the last seconds (ledger.go). Admission raises used as it lets
// creates through; this is what lowers it again when objects go, and
// corrects it when a create that was charged then failed.
type Controller struct {
	Client client.Client
	Log    *slog.Logger
	// Resync recounts every quota this often besides the events (30 s
	// if zero): a safety net for a missed event.
	Resync time.Duration
	Now    func() time.Time // time.Now if nil
}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	quotasOf := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		var l corev1.ResourceQuotaList
		if err := c.Client.List(ctx, &l, client.InNamespace(o.GetNamespace())); err != nil {
			return nil
		}
		out := make([]reconcile.Request, 0, len(l.Items))
		for _, q := range l.Items {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: q.Namespace, Name: q.Name}})
		}
		return out
	})
	// Admission charged the creates: a recount is due when an object
	// goes (or a pool shrinks), not at every create, which would recount
	// the whole namespace each time.
	gone := builder.WithPredicates(predicate.Funcs{
		CreateFunc:  func(event.CreateEvent) bool { return false },
		UpdateFunc:  func(event.UpdateEvent) bool { return false },
		DeleteFunc:  func(event.DeleteEvent) bool { return true },
		GenericFunc: func(event.GenericEvent) bool { return false },
	})
	shrunk := builder.WithPredicates(predicate.Funcs{
		CreateFunc: func(event.CreateEvent) bool { return false },
		UpdateFunc: func(e event.UpdateEvent) bool {
			o, n := e.ObjectOld.(*v1alpha1.WarmPool), e.ObjectNew.(*v1alpha1.WarmPool)
			return n.Spec.Replicas < o.Spec.Replicas
		},
		DeleteFunc:  func(event.DeleteEvent) bool { return true },
		GenericFunc: func(event.GenericEvent) bool { return false },
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("quota").
		// A quota's own writes are mostly admission's charges: a recount
		// is due when it is made or its limits change.
		For(&corev1.ResourceQuota{}, builder.WithPredicates(predicate.Funcs{
			UpdateFunc: func(e event.UpdateEvent) bool {
				o, n := e.ObjectOld.(*corev1.ResourceQuota), e.ObjectNew.(*corev1.ResourceQuota)
				return !apiequality.Semantic.DeepEqual(o.Spec, n.Spec)
			},
		})).
		Watches(&v1alpha1.Sandbox{}, quotasOf, gone).
		Watches(&v1alpha1.Snapshot{}, quotasOf, gone).
		Watches(&v1alpha1.SandboxTemplate{}, quotasOf, gone).
		Watches(&v1alpha1.WarmPool{}, quotasOf, shrunk).
		Complete(c)
}

// Reconcile recounts one quota.
func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	resync := c.Resync
	if resync == 0 {
		resync = 30 * time.Second
	}
	var q corev1.ResourceQuota
	if err := c.Client.Get(ctx, req.NamespacedName, &q); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	in := client.InNamespace(q.Namespace)
	var sbs v1alpha1.SandboxList
	var snaps v1alpha1.SnapshotList
	var tmpls v1alpha1.SandboxTemplateList
	var pools v1alpha1.WarmPoolList
	for _, l := range []client.ObjectList{&sbs, &snaps, &tmpls, &pools} {
		if err := c.Client.List(ctx, l, in); err != nil {
			return reconcile.Result{}, err
		}
	}
	// What the objects add up to, and what admission charged in the
	// last seconds for objects this cache may not show yet (ledger.go).
	used := Used(Objects{Sandboxes: sbs.Items, Snapshots: len(snaps.Items), Templates: len(tmpls.Items), WarmPools: pools.Items})
	recent, until := Recent(ParseLedger(q.Annotations), c.now())
	used = quotav1.Add(used, recent)
	st := Status(q.Spec.Hard, used)
	next := resync
	if !until.IsZero() {
		next = min(next, until.Sub(c.now())+10*time.Millisecond)
	}
	if apiequality.Semantic.DeepEqual(st, q.Status) {
		return reconcile.Result{RequeueAfter: next}, nil
	}
	q.Status = st
	// A whole-object update with the version read: one that raced an
	// admission's increment fails, and the next pass counts again.
	if err := c.Client.Update(ctx, &q); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	return reconcile.Result{RequeueAfter: next}, nil
}

func (c *Controller) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}
