package apiserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/client-go/dynamic"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/quota"
)

// finalizerAdmission is a built-in mutating admission plugin: every Sandbox
// is created with hearth's finalizer, so that deleting it waits for its host
// to stop its VM, without a second write by a controller to add it.
type finalizerAdmission struct{}

var _ admission.MutationInterface = finalizerAdmission{}

func (finalizerAdmission) Handles(op admission.Operation) bool { return op == admission.Create }

func (finalizerAdmission) Admit(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	gr := a.GetResource().GroupResource()
	if gr.Group != v1alpha1.GroupVersion.Group || gr.Resource != "sandboxes" || a.GetSubresource() != "" {
		return nil
	}
	u, ok := a.GetObject().(*unstructured.Unstructured)
	if !ok {
		return nil
	}
	if f := u.GetFinalizers(); !slices.Contains(f, v1alpha1.Finalizer) {
		u.SetFinalizers(append(f, v1alpha1.Finalizer))
	}
	return nil
}

// imageAdmission checks the images of sandboxes and templates that API
// users (all but the admin, system:masters) write: no files on the node
// (oci:DIR, docker-archive:FILE: the node opens them as root, so a tenant
// could boot whatever layout lies on the host, or probe any path through
// the error it gets back), and, if the cluster names its registries
// (hearthd --allowed-registries), only those.
type imageAdmission struct {
	allowed []string
}

var _ admission.ValidationInterface = imageAdmission{}

func (imageAdmission) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update
}

func (ia imageAdmission) Validate(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	if u := a.GetUserInfo(); u != nil && slices.Contains(u.GetGroups(), user.SystemPrivilegedGroup) {
		return nil
	}
	u, err := hearthWrite(a, "sandboxes", "sandboxtemplates")
	// Others may write an object the admin made (a node its finalizers):
	// what is refused is a new image.
	if u == nil || err != nil || unchanged(a, u, "spec", "image") {
		return err
	}
	ref, _, _ := unstructured.NestedString(u.Object, "spec", "image")
	if ref == "" {
		return nil // a sandbox from a snapshot or template names none
	}
	if image.IsLocal(ref) {
		return admission.NewForbidden(a, fmt.Errorf("spec.image %q: images from files on the host (oci:, docker-archive:) are for the admin and `hearth run --local`; give a registry reference", ref))
	}
	if len(ia.allowed) == 0 {
		return nil
	}
	reg, err := image.Registry(ref)
	if err != nil {
		return admission.NewForbidden(a, fmt.Errorf("spec.image: %w", err))
	}
	if !image.Listed(ia.allowed, reg) {
		return admission.NewForbidden(a, fmt.Errorf("spec.image %q: registry %s is not one this cluster pulls from (%s)", ref, reg, strings.Join(ia.allowed, ", ")))
	}
	return nil
}

// hearthWrite is the object a create or update writes, if it writes one of
// hearth's resources (not a subresource): nil for any other write.
func hearthWrite(a admission.Attributes, resources ...string) (*unstructured.Unstructured, error) {
	gr := a.GetResource().GroupResource()
	if gr.Group != v1alpha1.GroupVersion.Group || !slices.Contains(resources, gr.Resource) || a.GetSubresource() != "" {
		return nil, nil
	}
	u, ok := a.GetObject().(*unstructured.Unstructured)
	if !ok {
		return nil, admission.NewForbidden(a, fmt.Errorf("cannot read a %T", a.GetObject()))
	}
	return u, nil
}

// unchanged says whether a is an update that leaves the field at path of
// u as the old object had it.
func unchanged(a admission.Attributes, u *unstructured.Unstructured, path ...string) bool {
	old, ok := a.GetOldObject().(*unstructured.Unstructured)
	if !ok || a.GetOperation() != admission.Update {
		return false
	}
	was, _, _ := unstructured.NestedFieldNoCopy(old.Object, path...)
	now, _, _ := unstructured.NestedFieldNoCopy(u.Object, path...)
	return equality.Semantic.DeepEqual(was, now)
}

// routeHostAdmission gives a host name to one namespace: a Route whose
// spec.host another namespace's Route has is refused, so that one tenant
// cannot take another's traffic (or its TLS certificate's name). Two made
// at the same moment can both pass; the ingress then serves the older
// Route's namespace (internal/ingress indexRoutes).
//
// Names under the ingress's domain are its generated ones
// (PORT-SANDBOX-NAMESPACE.DOMAIN): no Route takes one. A namespace the
// admin annotated hearth.dev/route-hosts takes only the names it lists,
// so that the first tenant to ask cannot squat on another's name.
type routeHostAdmission struct {
	// claims are the Routes of every namespace with a host name.
	claims func(ctx context.Context, host string) ([]types.NamespacedName, error)
	// domain is the ingress's domain ("": none checked).
	domain string
	// namespace reads a namespace (its annotations) through the API.
	namespace func(ctx context.Context, name string) (*corev1.Namespace, error)
}

var _ admission.ValidationInterface = routeHostAdmission{}

func (routeHostAdmission) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update
}

func (r routeHostAdmission) Validate(ctx context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	u, err := hearthWrite(a, "routes")
	if u == nil || err != nil || unchanged(a, u, "spec", "host") {
		return err
	}
	host, _, _ := unstructured.NestedString(u.Object, "spec", "host")
	host = strings.ToLower(host)
	if d := strings.ToLower(r.domain); d != "" && (host == d || strings.HasSuffix(host, "."+d)) {
		return admission.NewForbidden(a, fmt.Errorf("spec.host %q is under the ingress's domain %s, whose names are its own (PORT-SANDBOX-NAMESPACE.%s)", host, d, d))
	}
	if r.namespace != nil {
		ns, err := r.namespace(ctx, a.GetNamespace())
		if err != nil {
			return admission.NewForbidden(a, fmt.Errorf("namespace %s: %w", a.GetNamespace(), err))
		}
		if err := routeHostAllowed(host, ns.Annotations[v1alpha1.AnnotationRouteHosts]); err != nil {
			return admission.NewForbidden(a, err)
		}
	}
	claims, err := r.claims(ctx, host)
	if err != nil {
		return admission.NewForbidden(a, fmt.Errorf("cannot tell which namespace owns host %q: %w", host, err))
	}
	for _, c := range claims {
		if c.Namespace != a.GetNamespace() {
			return admission.NewForbidden(a, fmt.Errorf("spec.host %q belongs to another namespace, whose Route claimed it first", host))
		}
	}
	return nil
}

// routeHostAllowed is the decision on a namespace's
// hearth.dev/route-hosts ("": any host).
func routeHostAllowed(host, allowed string) error {
	if strings.TrimSpace(allowed) == "" {
		return nil
	}
	var names []string
	for _, n := range strings.Split(allowed, ",") {
		n = strings.ToLower(strings.TrimSpace(n))
		if n == host || strings.HasPrefix(n, ".") && strings.HasSuffix(host, n) {
			return nil
		}
		names = append(names, n)
	}
	return fmt.Errorf("spec.host %q is not one this namespace may take (its %s: %s)", host, v1alpha1.AnnotationRouteHosts, strings.Join(names, ", "))
}

// routeClaims lists the Routes with a host name through the API (the
// loopback client), by the Route CRD's selectable field spec.host.
func routeClaims(cfg *rest.Config) (func(ctx context.Context, host string) ([]types.NamespacedName, error), error) {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	routes := dc.Resource(v1alpha1.GroupVersion.WithResource("routes"))
	return func(ctx context.Context, host string) ([]types.NamespacedName, error) {
		list, err := routes.List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.host", host).String()})
		if err != nil {
			return nil, err
		}
		out := make([]types.NamespacedName, 0, len(list.Items))
		for _, it := range list.Items {
			out = append(out, types.NamespacedName{Namespace: it.GetNamespace(), Name: it.GetName()})
		}
		return out, nil
	}, nil
}

// limitAdmission fills in the resources a sandbox or template leaves
// unset, from its namespace's LimitRanges (type Sandbox) or the cluster's
// defaults, and refuses those outside the LimitRanges' min and max
// (quota.ApplyLimits). It mutates, so quota admission, which validates
// after it, charges what the sandbox will have.
type limitAdmission struct {
	ranges corelisters.LimitRangeLister
	synced func() bool
}

var _ admission.MutationInterface = limitAdmission{}

func (limitAdmission) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update
}

func (l limitAdmission) Admit(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	u, err := hearthWrite(a, "sandboxes", "sandboxtemplates")
	// A write that leaves the resources as they were (a node's finalizer)
	// is not held to a LimitRange made since.
	if u == nil || err != nil || unchanged(a, u, "spec", "resources") {
		return err
	}
	raw, _, err := unstructured.NestedMap(u.Object, "spec", "resources")
	if err != nil {
		return admission.NewForbidden(a, fmt.Errorf("spec.resources: %w", err))
	}
	if !l.synced() {
		return admission.NewForbidden(a, errors.New("the namespace's LimitRanges are not loaded yet; try again"))
	}
	var r v1alpha1.Resources
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &r); err != nil {
		return admission.NewForbidden(a, fmt.Errorf("spec.resources: %w", err))
	}
	ranges, err := l.ranges.LimitRanges(a.GetNamespace()).List(labels.Everything())
	if err != nil {
		return admission.NewForbidden(a, fmt.Errorf("the namespace's LimitRanges: %w", err))
	}
	list := make([]corev1.LimitRange, 0, len(ranges))
	for _, lr := range ranges {
		list = append(list, *lr)
	}
	// Deterministic: the first default by name.
	slices.SortFunc(list, func(x, y corev1.LimitRange) int { return strings.Compare(x.Name, y.Name) })
	if err := quota.ApplyLimits(list, &r, "spec.resources"); err != nil {
		return admission.NewForbidden(a, err)
	}
	out, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&r)
	if err != nil {
		return err
	}
	return unstructured.SetNestedMap(u.Object, out, "spec", "resources")
}
