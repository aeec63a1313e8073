package apiserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	autoscalingv1 "k8s.io/api/autoscaling/v1"
	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apiresource "k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/admission"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	quotav1 "k8s.io/apiserver/pkg/quota/v1"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	corev1listers "k8s.io/client-go/listers/core/v1"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/quota"
)

// quotaAdmission is ResourceQuota admission, with Kubernetes' semantics:
// a create (or a warm pool's growth) that would take a namespace past a
// quota's spec.hard is refused with 403, naming the quota; one that fits
// raises the quota's status.used, with the quota's resourceVersion, before
// the object is stored, so that concurrent creates cannot both take the
// last of it. internal/quota.Controller lowers used again as objects go.
//
// Charges to one quota are batched, as kube-apiserver's quota admission
// does: the requests that arrive while a write to the quota is in flight
// are decided together, in order, and written as one, so that a quota
// costs a write per batch, not per create.
type quotaAdmission struct {
	quotas corev1listers.ResourceQuotaLister // which quotas a namespace has
	store  *quotaStore                       // where charges are written

	mu       sync.Mutex
	chargers map[string]*charger // by namespace/name
}

// charger serializes the charges to one quota.
type charger struct {
	mu      sync.Mutex
	pending []*charge
	busy    bool // a goroutine is deciding and writing a batch
	last    *corev1.ResourceQuota
	// reserve is headroom charged with the last write and not yet given
	// out, good until reserveUntil: the creates that follow a batch take
	// from it without a write of their own.
	reserve      corev1.ResourceList
	reserveUntil time.Time
}

// A reservation is reserveFactor times what the batch that made it took,
// for at most reserveFor: well within quota.ChargeGrace, so that what was
// created from it is in the controller's cache before the ledger forgets
// the reservation's charge.
const (
	reserveFactor = 8
	reserveFor    = time.Second
)

type charge struct {
	delta corev1.ResourceList
	dry   bool
	done  chan error
}

var _ admission.ValidationInterface = &quotaAdmission{}

func (*quotaAdmission) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update
}

func (q *quotaAdmission) Validate(ctx context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	ns := a.GetNamespace()
	if ns == "" {
		return nil
	}
	delta, err := usageDelta(a)
	if err != nil || len(delta) == 0 {
		return err
	}
	quotas, err := q.quotas.ResourceQuotas(ns).List(labels.Everything())
	if err != nil || len(quotas) == 0 {
		return err
	}
	slices.SortFunc(quotas, func(x, y *corev1.ResourceQuota) int { return strings.Compare(x.Name, y.Name) })
	for _, cached := range quotas {
		err := q.charge(ctx, cached, delta, a.IsDryRun())
		var ex *quota.Exceeded
		switch {
		case errors.As(err, &ex):
			return admission.NewForbidden(a, ex)
		case errors.Is(err, quota.ErrUnknown):
			return admission.NewForbidden(a, fmt.Errorf("%w: try again in a moment", err))
		case err != nil:
			return err
		}
	}
	return nil
}

// charge raises one quota's used by delta, or refuses, with the charges
// that arrive meanwhile.
func (q *quotaAdmission) charge(ctx context.Context, cached *corev1.ResourceQuota, delta corev1.ResourceList, dry bool) error {
	// By UID: a quota deleted and made again is another, and nothing
	// reserved under the old one carries over.
	key := string(cached.UID)
	q.mu.Lock()
	if q.chargers == nil {
		q.chargers = map[string]*charger{}
	}
	c := q.chargers[key]
	if c == nil {
		c = &charger{}
		q.chargers[key] = c
	}
	q.mu.Unlock()
	r := &charge{delta: delta, dry: dry, done: make(chan error, 1)}
	c.mu.Lock()
	c.pending = append(c.pending, r)
	lead := !c.busy
	c.busy = true
	c.mu.Unlock()
	if lead {
		// This request decides the batches until none is waiting; the
		// writes outlive its own context (others wait on them).
		go q.serve(c, cached)
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// serve decides and writes batches of c's charges until none is left.
func (q *quotaAdmission) serve(c *charger, cached *corev1.ResourceQuota) {
	for {
		c.mu.Lock()
		batch := c.pending
		c.pending = nil
		if len(batch) == 0 {
			c.busy = false
			c.mu.Unlock()
			return
		}
		// The quota as this server last wrote it, else as the cache has
		// it; if either is stale, the write conflicts and decide reads it.
		cur := c.last
		if cur == nil {
			cur = cached
		}
		// What a live reservation covers is granted now (not past its
		// time, nor once the quota's limits changed, by the cache).
		var rest []*charge
		live := c.reserve != nil && time.Now().Before(c.reserveUntil) && apiequality.Semantic.DeepEqual(cur.Spec.Hard, cached.Spec.Hard)
		for _, r := range batch {
			if left, ok := quota.Take(cur.Spec.Hard, c.reserve, r.delta); live && ok && !r.dry {
				c.reserve = left
				r.done <- nil
				continue
			}
			rest = append(rest, r)
		}
		// The rest of the reservation goes back with the next write.
		unspent := c.reserve
		c.reserve = nil
		c.mu.Unlock()
		if len(rest) == 0 {
			c.mu.Lock()
			c.reserve = unspent
			c.mu.Unlock()
			continue
		}
		last, reserve, results := q.decide(cur, unspent, rest)
		c.mu.Lock()
		c.last, c.reserve, c.reserveUntil = last, reserve, time.Now().Add(reserveFor)
		c.mu.Unlock()
		for i, r := range rest {
			r.done <- results[i]
		}
	}
}

// decide fits each charge of the batch in turn and writes the quota once
// with those that fit, and a reservation for those to come: on a
// conflict, it decides again on what the quota holds now. It returns the
// quota as written, the reservation it holds, and each charge's answer.
//
// unspent is what this server reserved with its last write (cur, as it
// wrote it) and did not give out: it is taken off used, and so given back
// by this write. Once cur is read again, the controller may have counted
// it out already: it is forgotten.
func (q *quotaAdmission) decide(cur *corev1.ResourceQuota, unspent corev1.ResourceList, batch []*charge) (*corev1.ResourceQuota, corev1.ResourceList, []error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	results := make([]error, len(batch))
	fresh := false // cur was just read from storage
	for attempt := 0; ; attempt++ {
		if fresh {
			unspent = nil
		}
		base := quotav1.Subtract(cur.Status.Used, unspent)
		used := base.DeepCopy()
		refused := false
		for i, r := range batch {
			// The limits are the spec's: a quota just made, or just given
			// another limit, bounds at once (its used is then unknown,
			// and the create waits for the controller's count).
			next, err := quota.Fit(cur.Name, corev1.ResourceQuotaStatus{Hard: cur.Spec.Hard, Used: used}, r.delta)
			results[i] = err
			refused = refused || err != nil
			if err == nil && !r.dry {
				used = next
			}
		}
		if refused && !fresh {
			// Refused on what this server last saw: the controller may
			// have given room back since. Decide again on what is stored.
			live, err := q.store.get(ctx, cur.Namespace, cur.Name)
			if err == nil && live.ResourceVersion != cur.ResourceVersion {
				cur, fresh = live, true
				continue
			}
			fresh = true
		}
		if quotav1.Equals(used, cur.Status.Used) {
			return cur, nil, results
		}
		// What this write charges: the batch's creates and the new
		// reservation (what goes back is no charge), in the ledger too.
		charged := quotav1.Subtract(used, base)
		reserve := quota.Reserve(cur.Spec.Hard, used, charged, reserveFactor)
		charged = quotav1.Add(charged, reserve)
		next := cur.DeepCopy()
		next.Status.Used = quotav1.Add(used, reserve)
		if next.Annotations == nil {
			next.Annotations = map[string]string{}
		}
		next.Annotations[quota.Charges] = quota.Record(quota.ParseLedger(cur.Annotations), time.Now(), charged)
		written, err := q.store.update(ctx, next)
		if err == nil {
			return written, reserve, results
		}
		if apierrors.IsNotFound(err) {
			return nil, nil, make([]error, len(batch)) // the quota is gone: it bounds nothing
		}
		if apierrors.IsConflict(err) && attempt < 20 {
			// Another API server, or the controller, changed it.
			live, gerr := q.store.get(ctx, cur.Namespace, cur.Name)
			if gerr == nil {
				cur, fresh = live, true
				continue
			}
			err = gerr
		}
		for i := range results {
			results[i] = fmt.Errorf("charge quota %s: %w", cur.Name, err)
		}
		return nil, nil, results
	}
}

// quotaStore reads and writes quotas in the server's own storage, not
// through its HTTP handlers: a charge is on the path of every create it
// counts, and the handler chain (TLS, authentication, authorization,
// encoding) would double its cost. The writes are the system's own.
type quotaStore struct{ s *genericregistry.Store }

func (q *quotaStore) get(ctx context.Context, ns, name string) (*corev1.ResourceQuota, error) {
	obj, err := q.s.Get(genericapirequest.WithNamespace(ctx, ns), name, &metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return obj.(*corev1.ResourceQuota), nil
}

func (q *quotaStore) update(ctx context.Context, rq *corev1.ResourceQuota) (*corev1.ResourceQuota, error) {
	obj, _, err := q.s.Update(genericapirequest.WithNamespace(ctx, rq.Namespace), rq.Name, rest.DefaultUpdatedObjectInfo(rq),
		rest.ValidateAllObjectFunc, rest.ValidateAllObjectUpdateFunc, false, &metav1.UpdateOptions{})
	if err != nil {
		return nil, err
	}
	return obj.(*corev1.ResourceQuota), nil
}

// usageDelta is what the request adds to its namespace's use.
func usageDelta(a admission.Attributes) (corev1.ResourceList, error) {
	gr := a.GetResource().GroupResource()
	if gr.Group != v1alpha1.GroupVersion.Group {
		return nil, nil
	}
	create := a.GetOperation() == admission.Create
	switch {
	case gr.Resource == "sandboxes" && a.GetSubresource() == "":
		var sb, old v1alpha1.Sandbox
		if err := fromUnstructured(a.GetObject(), &sb); err != nil {
			return nil, err
		}
		if create {
			return quota.Sandbox(&sb), nil
		}
		if err := fromUnstructured(a.GetOldObject(), &old); err != nil {
			return nil, err
		}
		d := quotav1.Subtract(quota.Sandbox(&sb), quota.Sandbox(&old))
		delete(d, quota.Sandboxes)
		return d, nil
	case gr.Resource == "snapshots" && create && a.GetSubresource() == "":
		return quota.Count(quota.Snapshots), nil
	case gr.Resource == "sandboxtemplates" && create && a.GetSubresource() == "":
		return quota.Count(quota.Templates), nil
	case gr.Resource == "warmpools" && a.GetSubresource() == "":
		var p, old v1alpha1.WarmPool
		if err := fromUnstructured(a.GetObject(), &p); err != nil {
			return nil, err
		}
		if create {
			return quota.WarmPool(&p), nil
		}
		if err := fromUnstructured(a.GetOldObject(), &old); err != nil {
			return nil, err
		}
		return corev1.ResourceList{quota.WarmPoolReplicas: *apiresource.NewQuantity(int64(p.Spec.Replicas-old.Spec.Replicas), apiresource.DecimalSI)}, nil
	case gr.Resource == "warmpools" && a.GetSubresource() == "scale" && !create:
		s, ok1 := a.GetObject().(*autoscalingv1.Scale)
		old, ok2 := a.GetOldObject().(*autoscalingv1.Scale)
		if !ok1 || !ok2 {
			return nil, nil
		}
		return corev1.ResourceList{quota.WarmPoolReplicas: *apiresource.NewQuantity(int64(s.Spec.Replicas-old.Spec.Replicas), apiresource.DecimalSI)}, nil
	}
	return nil, nil
}

func fromUnstructured(obj runtime.Object, into any) error {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return fmt.Errorf("quota admission: %T is not unstructured", obj)
	}
	return runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into)
}

// validateQuota accepts the resources hearth's quotas count, and only
// those: a name it does not know would bound nothing.
func validateQuota(obj runtime.Object) field.ErrorList {
	var errs field.ErrorList
	q := obj.(*corev1.ResourceQuota)
	known := resourceNames(quota.Known)
	for n, v := range q.Spec.Hard {
		p := field.NewPath("spec", "hard").Key(string(n))
		if !slices.Contains(quota.Known, n) {
			errs = append(errs, field.NotSupported(p, n, known))
		}
		if v.Sign() < 0 {
			errs = append(errs, field.Invalid(p, v.String(), "must not be negative"))
		}
	}
	if len(q.Spec.Scopes) > 0 || q.Spec.ScopeSelector != nil {
		errs = append(errs, field.Forbidden(field.NewPath("spec", "scopes"), "hearth's quotas have no scopes"))
	}
	return errs
}

func resourceNames(list []corev1.ResourceName) []string {
	out := make([]string, 0, len(list))
	for _, n := range list {
		out = append(out, string(n))
	}
	return out
}

// validateLimitRange admits LimitRanges of hearth's one item type,
// Sandbox (quota.LimitTypeSandbox), over cpu, memory and disk.
func validateLimitRange(obj runtime.Object) field.ErrorList {
	var errs field.ErrorList
	lr := obj.(*corev1.LimitRange)
	names := resourceNames(quota.LimitResources)
	for i, item := range lr.Spec.Limits {
		p := field.NewPath("spec", "limits").Index(i)
		if item.Type != quota.LimitTypeSandbox {
			errs = append(errs, field.NotSupported(p.Child("type"), item.Type, []string{string(quota.LimitTypeSandbox)}))
		}
		for what, l := range map[string]corev1.ResourceList{"default": item.Default, "max": item.Max, "min": item.Min,
			"defaultRequest": item.DefaultRequest, "maxLimitRequestRatio": item.MaxLimitRequestRatio} {
			for n, v := range l {
				if what == "defaultRequest" || what == "maxLimitRequestRatio" {
					errs = append(errs, field.Forbidden(p.Child(what), "hearth's sandboxes have requests only: give default, min and max"))
					break
				}
				if !slices.Contains(quota.LimitResources, n) {
					errs = append(errs, field.NotSupported(p.Child(what).Key(string(n)), n, names))
				}
				if v.Sign() < 0 {
					errs = append(errs, field.Invalid(p.Child(what).Key(string(n)), v.String(), "must not be negative"))
				}
			}
		}
	}
	return errs
}
