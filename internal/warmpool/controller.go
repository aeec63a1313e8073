// Package warmpool keeps the sandboxes of each WarmPool: it starts
// sandboxes from the pool's template until the pool has spec.replicas
// unclaimed ones, hands a ready one to each Sandbox that claims the pool
// (spec.source.warmPool) by binding the claim to its host, where the node
// agent moves the running VM over to the claim, and reports the counts.
package warmpool

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	ctrl "sigs.k8s.io/controller-runtime"

	"hearth.dev/hearth/api/v1alpha1"
)

// poolIndex indexes sandboxes by the pool they belong to or claim.
const poolIndex = "warmPool"

// Controller is the warm pool controller.
type Controller struct {
	Client   client.Client
	Recorder record.EventRecorder
	Log      *slog.Logger

	mu sync.Mutex
	// expect are the members this controller created or deleted that its
	// cache may not show yet, by pool: counted as the controller left
	// them, as a ReplicaSet controller's expectations, so that a pass on
	// a stale cache neither makes nor deletes too many.
	expect map[types.NamespacedName]map[string]bool
}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	c.expect = map[types.NamespacedName]map[string]bool{}
	if err := mgr.GetFieldIndexer().IndexField(ctx, &v1alpha1.Sandbox{}, poolIndex, func(o client.Object) []string {
		if p := poolOf(o.(*v1alpha1.Sandbox)); p != "" {
			return []string{p}
		}
		return nil
	}); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("warmpool").
		For(&v1alpha1.WarmPool{}).
		Watches(&v1alpha1.Sandbox{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			if p := poolOf(o.(*v1alpha1.Sandbox)); p != "" {
				return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: p}}}
			}
			return nil
		})).
		Watches(&v1alpha1.SandboxTemplate{}, handler.EnqueueRequestsFromMapFunc(c.poolsOf)).
		Complete(c)
}

// poolOf is the pool a sandbox belongs to (a member) or claims.
func poolOf(sb *v1alpha1.Sandbox) string {
	if p := sb.Labels[v1alpha1.LabelWarmPool]; p != "" {
		return p
	}
	if sb.ClaimsWarmPool() {
		return sb.Spec.Source.WarmPool
	}
	return ""
}

// poolsOf are the pools of a template.
func (c *Controller) poolsOf(ctx context.Context, o client.Object) []reconcile.Request {
	var pools v1alpha1.WarmPoolList
	if err := c.Client.List(ctx, &pools, client.InNamespace(o.GetNamespace())); err != nil {
		return nil
	}
	var out []reconcile.Request
	for _, p := range pools.Items {
		if p.Spec.Template == o.GetName() {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: p.Namespace, Name: p.Name}})
		}
	}
	return out
}

// Reconcile serves the pool's waiting claims, makes or removes sandboxes
// to keep spec.replicas unclaimed ones, and writes the status.
func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var sbs v1alpha1.SandboxList
	if err := c.Client.List(ctx, &sbs, client.InNamespace(req.Namespace), client.MatchingFields{poolIndex: req.Name}); err != nil {
		return reconcile.Result{}, err
	}
	var pool v1alpha1.WarmPool
	if err := c.Client.Get(ctx, req.NamespacedName, &pool); err != nil {
		if !apierrors.IsNotFound(err) {
			return reconcile.Result{}, err
		}
		// Gone: its unclaimed sandboxes go with it (hearth has no
		// garbage collector of owner references).
		for i := range sbs.Items {
			if m := &sbs.Items[i]; m.Labels[v1alpha1.LabelWarmPool] == req.Name && m.Annotations[v1alpha1.AnnotationClaimedBy] == "" {
				if err := c.Client.Delete(ctx, m); client.IgnoreNotFound(err) != nil {
					return reconcile.Result{}, err
				}
			}
		}
		return reconcile.Result{}, nil
	}

	seen := map[string]bool{}
	claims := map[string]*v1alpha1.Sandbox{} // by UID
	for i := range sbs.Items {
		if sb := &sbs.Items[i]; sb.Labels[v1alpha1.LabelWarmPool] != pool.Name {
			claims[string(sb.UID)] = sb
		}
	}
	var ready, starting, waiting []*v1alpha1.Sandbox
	var claimed int32
	templateErr := ""
	for i := range sbs.Items {
		sb := &sbs.Items[i]
		seen[sb.Name] = true
		switch {
		case sb.Labels[v1alpha1.LabelWarmPool] == pool.Name && orphaned(sb, claims):
			if err := c.remove(ctx, req.NamespacedName, sb); err != nil {
				return reconcile.Result{}, err
			}
		case sb.Labels[v1alpha1.LabelWarmPool] != pool.Name: // a claim
			switch {
			case sb.Status.Phase.Terminal() || !sb.DeletionTimestamp.IsZero():
			case sb.Status.HostName != "":
				claimed++
			default:
				waiting = append(waiting, sb)
			}
		case sb.Annotations[v1alpha1.AnnotationClaimedBy] != "" || !sb.DeletionTimestamp.IsZero() || c.expected(req.NamespacedName, sb.Name, false):
		case sb.Status.Phase.Terminal():
			if err := c.remove(ctx, req.NamespacedName, sb); err != nil {
				return reconcile.Result{}, err
			}
		case sb.Status.Phase == v1alpha1.PhaseRunning && meta.IsStatusConditionTrue(sb.Status.Conditions, v1alpha1.ConditionReady):
			ready = append(ready, sb)
		default:
			if sb.Status.Reason == "TemplateError" {
				templateErr = sb.Status.Message
			}
			starting = append(starting, sb)
		}
	}
	pending := c.pending(req.NamespacedName, seen)
	byAge := func(l []*v1alpha1.Sandbox) {
		sort.SliceStable(l, func(i, j int) bool { return l[i].CreationTimestamp.Before(&l[j].CreationTimestamp) })
	}
	byAge(ready)
	byAge(waiting)
	byAge(starting)

	// Serve the oldest claims first, each with the oldest ready sandbox
	// that suits it.
	requeue := false
	var unserved []*v1alpha1.Sandbox
	for ; len(waiting) > 0 && len(ready) > 0; waiting = waiting[1:] {
		cl := waiting[0]
		i, err := c.suitable(ctx, cl, ready)
		if err != nil {
			return reconcile.Result{}, err
		}
		if i < 0 {
			unserved = append(unserved, cl)
			continue
		}
		m := ready[i]
		ready = slices.Delete(ready, i, i+1)
		switch err := c.claim(ctx, cl, m); {
		case err == nil:
			claimed++
		case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
			requeue = true
		default:
			return reconcile.Result{}, err
		}
	}
	waiting = append(unserved, waiting...)
	for _, cl := range waiting {
		if err := c.wait(ctx, cl, &pool); err != nil && !apierrors.IsConflict(err) {
			return reconcile.Result{}, client.IgnoreNotFound(err)
		}
	}

	var tpl v1alpha1.SandboxTemplate
	tplErr := c.Client.Get(ctx, types.NamespacedName{Namespace: pool.Namespace, Name: pool.Spec.Template}, &tpl)
	if tplErr != nil && !apierrors.IsNotFound(tplErr) {
		return reconcile.Result{}, tplErr
	}
	// Claims that wait get more sandboxes started at once, up to as many
	// again as the pool keeps.
	want := int(pool.Spec.Replicas) + min(len(waiting), int(pool.Spec.Replicas))
	have := len(ready) + len(starting) + pending
	// Those made for waiting claims that need hardware isolation need it
	// too, so that the scheduler puts them on KVM hosts.
	hardware := 0
	for _, cl := range waiting {
		if cl.Spec.Isolation == v1alpha1.IsolationHardware {
			hardware++
		}
	}
	for made := 0; have < want && tplErr == nil; have, made = have+1, made+1 {
		if err := c.create(ctx, &pool, &tpl, made < hardware); err != nil {
			return reconcile.Result{}, err
		}
		pending++
	}
	// Too many: the newest go first, those still starting before ready ones.
	extra := append(append([]*v1alpha1.Sandbox(nil), ready...), starting...)
	for ; have > want && len(extra) > 0; have-- {
		m := extra[len(extra)-1]
		extra = extra[:len(extra)-1]
		if err := c.remove(ctx, req.NamespacedName, m); err != nil {
			return reconcile.Result{}, err
		}
		if len(starting) > 0 && m == starting[len(starting)-1] {
			starting = starting[:len(starting)-1]
		} else if len(ready) > 0 {
			ready = ready[:len(ready)-1]
		}
	}

	orig := pool.DeepCopy()
	st := &pool.Status
	st.ReadyReplicas, st.Refilling = int32(len(ready)), int32(len(starting)+pending)
	st.Replicas, st.Claimed, st.Waiting = st.ReadyReplicas+st.Refilling, claimed, int32(len(waiting))
	st.Selector = v1alpha1.LabelWarmPool + "=" + pool.Name
	st.ObservedGeneration = pool.Generation
	cond := metav1.Condition{Type: v1alpha1.WarmPoolReady, Status: metav1.ConditionTrue, Reason: "Ready",
		Message: fmt.Sprintf("%d of %d ready", st.ReadyReplicas, pool.Spec.Replicas), ObservedGeneration: pool.Generation}
	switch {
	case tplErr != nil:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "TemplateNotFound", fmt.Sprintf("template %q does not exist", pool.Spec.Template)
	case templateErr != "" && st.ReadyReplicas < pool.Spec.Replicas:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "TemplateError", templateErr
	case st.ReadyReplicas < pool.Spec.Replicas:
		cond.Status, cond.Reason = metav1.ConditionFalse, "Refilling"
	}
	meta.SetStatusCondition(&st.Conditions, cond)
	if err := c.Client.Status().Patch(ctx, &pool, client.MergeFrom(orig)); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	return reconcile.Result{Requeue: requeue}, nil
}

// suitable is the index of the first of ready that the claim cl may
// take over, or -1: a claim that needs hardware isolation takes only a
// sandbox on a KVM host, as the scheduler would have placed it.
func (c *Controller) suitable(ctx context.Context, cl *v1alpha1.Sandbox, ready []*v1alpha1.Sandbox) (int, error) {
	if cl.Spec.Isolation != v1alpha1.IsolationHardware {
		return 0, nil
	}
	for i, m := range ready {
		var h v1alpha1.Host
		err := c.Client.Get(ctx, types.NamespacedName{Name: m.Status.HostName}, &h)
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return -1, err
		case h.Status.Accel == v1alpha1.AccelKVM:
			return i, nil
		}
	}
	return -1, nil
}

// orphaned reports whether m was marked taken by a claim that is gone or
// that went to another member: its VM will never be taken over.
func orphaned(m *v1alpha1.Sandbox, claims map[string]*v1alpha1.Sandbox) bool {
	uid := m.Annotations[v1alpha1.AnnotationClaimedBy]
	if uid == "" || !m.DeletionTimestamp.IsZero() {
		return false
	}
	cl, ok := claims[uid]
	return !ok || !cl.DeletionTimestamp.IsZero() || cl.Status.Phase.Terminal() ||
		(cl.Status.WarmPoolMember != "" && cl.Status.WarmPoolMember != m.Name)
}

// claim gives the pool's ready sandbox m to the claim cl: m is marked
// taken (an update that fails if another pass took it first), then cl is
// bound to m's host with m's name, for the node agent to move m's VM over.
func (c *Controller) claim(ctx context.Context, cl, m *v1alpha1.Sandbox) error {
	taken := m.DeepCopy()
	if taken.Annotations == nil {
		taken.Annotations = map[string]string{}
	}
	taken.Annotations[v1alpha1.AnnotationClaimedBy] = string(cl.UID)
	if err := c.Client.Update(ctx, taken); err != nil {
		return err
	}
	bound := cl.DeepCopy()
	st := &bound.Status
	st.HostName, st.WarmPoolMember, st.Phase, st.Reason, st.Message = m.Status.HostName, m.Name, v1alpha1.PhaseScheduled, "", ""
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionScheduled, Status: metav1.ConditionTrue,
		Reason: "Claimed", Message: "takes over warm pool sandbox " + m.Name})
	if err := c.Client.Status().Patch(ctx, bound, client.MergeFromWithOptions(cl, client.MergeFromWithOptimisticLock{})); err != nil {
		// Not bound: give m back to the pool.
		delete(taken.Annotations, v1alpha1.AnnotationClaimedBy)
		if uerr := c.Client.Update(ctx, taken); uerr != nil {
			c.Log.Warn("give a warm pool sandbox back", "sandbox", m.Name, "err", uerr)
		}
		return err
	}
	c.Recorder.Eventf(bound, corev1.EventTypeNormal, "Claimed", "Takes over warm pool sandbox %s on host %s", m.Name, m.Status.HostName)
	return nil
}

// wait says in a claim's status that it waits for the pool.
func (c *Controller) wait(ctx context.Context, cl *v1alpha1.Sandbox, pool *v1alpha1.WarmPool) error {
	msg := fmt.Sprintf("waiting for a ready sandbox of warm pool %s", pool.Name)
	if cl.Status.Phase == v1alpha1.PhasePending && cl.Status.Reason == "WaitingForWarmPool" && cl.Status.Message == msg {
		return nil
	}
	orig := cl.DeepCopy()
	cl.Status.Phase, cl.Status.Reason, cl.Status.Message = v1alpha1.PhasePending, "WaitingForWarmPool", msg
	return c.Client.Status().Patch(ctx, cl, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
}

// create starts one more sandbox of the pool, one that needs hardware
// isolation if hardware.
func (c *Controller) create(ctx context.Context, pool *v1alpha1.WarmPool, tpl *v1alpha1.SandboxTemplate, hardware bool) error {
	yes := true
	sb := &v1alpha1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: pool.Namespace, GenerateName: pool.Name + "-",
			Labels: map[string]string{v1alpha1.LabelWarmPool: pool.Name},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "WarmPool",
				Name: pool.Name, UID: pool.UID, Controller: &yes}},
		},
		Spec: v1alpha1.SandboxSpec{
			Image:         tpl.Spec.Image,
			Source:        &v1alpha1.SandboxSource{Template: tpl.Name},
			Resources:     tpl.Spec.Resources,
			RestartPolicy: v1alpha1.RestartAlways,
		},
	}
	if hardware {
		sb.Spec.Isolation = v1alpha1.IsolationHardware
	}
	if err := c.Client.Create(ctx, sb); err != nil {
		return err
	}
	c.note(types.NamespacedName{Namespace: pool.Namespace, Name: pool.Name}, sb.Name, true)
	return nil
}

// remove deletes one of the pool's sandboxes.
func (c *Controller) remove(ctx context.Context, pool types.NamespacedName, sb *v1alpha1.Sandbox) error {
	if err := c.Client.Delete(ctx, sb); client.IgnoreNotFound(err) != nil {
		return err
	}
	c.note(pool, sb.Name, false)
	return nil
}

// note records a member created (true) or deleted (false) that the cache
// may not show yet.
func (c *Controller) note(pool types.NamespacedName, name string, created bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.expect[pool] == nil {
		c.expect[pool] = map[string]bool{}
	}
	c.expect[pool][name] = created
}

// expected reports whether name is a member this controller deleted,
// which the cache still shows alive.
func (c *Controller) expected(pool types.NamespacedName, name string, created bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.expect[pool][name]
	return ok && v == created
}

// pending settles the expectations against the cache's members (seen)
// and returns how many created members it does not show yet.
func (c *Controller) pending(pool types.NamespacedName, seen map[string]bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for name, created := range c.expect[pool] {
		switch {
		case created && seen[name], !created && !seen[name]:
			delete(c.expect[pool], name)
		case created:
			n++
		}
	}
	return n
}
