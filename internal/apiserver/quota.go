package apiserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	autoscalingv1 "k8s.io/api/autoscaling/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apiresource "k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/admission"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
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
type quotaAdmission struct {
	quotas corev1listers.ResourceQuotaLister // which quotas a namespace has
	client func(ns string) corev1client.ResourceQuotaInterface
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
	slices.SortFunc(quotas, func(x, y *corev1.ResourceQuota) int { return cmpString(x.Name, y.Name) })
	for _, cached := range quotas {
		if err := q.charge(ctx, a, cached, delta); err != nil {
			return err
		}
	}
	return nil
}

// charge raises one quota's used by delta, or refuses.
func (q *quotaAdmission) charge(ctx context.Context, a admission.Attributes, cached *corev1.ResourceQuota, delta corev1.ResourceList) error {
	cur := cached.DeepCopy()
	for attempt := 0; ; attempt++ {
		used, err := quota.Fit(cur.Name, cur.Status, delta)
		var ex *quota.Exceeded
		switch {
		case errors.As(err, &ex):
			return admission.NewForbidden(a, ex)
		case errors.Is(err, quota.ErrUnknown):
			return admission.NewForbidden(a, fmt.Errorf("%w: try again in a moment", err))
		case err != nil:
			return err
		}
		if a.IsDryRun() || apiequalityUsed(used, cur.Status.Used) {
			return nil
		}
		cur.Status.Used = used
		if cur.Annotations == nil {
			cur.Annotations = map[string]string{}
		}
		cur.Annotations[quota.ChargedAt] = time.Now().UTC().Format(time.RFC3339Nano)
		_, err = q.client(cur.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsConflict(err) || attempt >= 20 {
			return fmt.Errorf("charge quota %s: %w", cur.Name, err)
		}
		// Another create, or the controller, changed it: again, on what
		// it holds now.
		if cur, err = q.client(cur.Namespace).Get(ctx, cur.Name, metav1.GetOptions{}); err != nil {
			return fmt.Errorf("quota %s: %w", cached.Name, err)
		}
	}
}

func apiequalityUsed(a, b corev1.ResourceList) bool {
	if len(a) != len(b) {
		return false
	}
	for n, q := range a {
		if p, ok := b[n]; !ok || p.Cmp(q) != 0 {
			return false
		}
	}
	return true
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
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
		d := quota.Sub(quota.Sandbox(&sb), quota.Sandbox(&old))
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
	known := make([]string, 0, len(quota.Known))
	for _, n := range quota.Known {
		known = append(known, string(n))
	}
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
