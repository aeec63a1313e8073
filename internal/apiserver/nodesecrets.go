package apiserver

import (
	"context"
	"fmt"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

// nodeSecrets lets a node agent get the Secrets its own sandboxes pull
// their images with (spec.imagePullSecrets of a sandbox bound to it), as
// kube-apiserver's Node authorizer lets a kubelet read its pods' secrets,
// and those of templates, which every host builds; RBAC gives nodes no
// Secret at all. It allows or has no opinion.
type nodeSecrets struct {
	// pullers lists what in namespace ns host pulls images for: the
	// sandboxes bound to it and the namespace's templates.
	pullers func(ctx context.Context, ns, host string) ([]unstructured.Unstructured, error)
}

func (n nodeSecrets) Authorize(ctx context.Context, a authorizer.Attributes) (authorizer.Decision, string, error) {
	if !a.IsResourceRequest() || a.GetVerb() != "get" || a.GetAPIGroup() != "" || a.GetResource() != "secrets" ||
		a.GetSubresource() != "" || a.GetName() == "" || a.GetNamespace() == "" {
		return authorizer.DecisionNoOpinion, "", nil
	}
	u := a.GetUser()
	host, ok := strings.CutPrefix(u.GetName(), pki.NodeUserPrefix)
	if !ok || host == "" || !slices.Contains(u.GetGroups(), pki.GroupNodes) {
		return authorizer.DecisionNoOpinion, "", nil
	}
	objs, err := n.pullers(ctx, a.GetNamespace(), host)
	if err != nil {
		return authorizer.DecisionNoOpinion, "", fmt.Errorf("what %s pulls images for: %w", host, err)
	}
	for _, o := range objs {
		refs, _, _ := unstructured.NestedSlice(o.Object, "spec", "imagePullSecrets")
		for _, r := range refs {
			if m, ok := r.(map[string]any); ok && m["name"] == a.GetName() {
				return authorizer.DecisionAllow, "a pull secret of " + strings.ToLower(o.GetKind()) + " " + o.GetName() + ", which this node runs", nil
			}
		}
	}
	return authorizer.DecisionNoOpinion, "", nil
}

// pullers lists, through the API (the loopback client), a namespace's
// sandboxes bound to a host (by the CRD's selectable field
// status.hostName) and its templates.
func pullers(cfg *rest.Config) (func(ctx context.Context, ns, host string) ([]unstructured.Unstructured, error), error) {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	sandboxes := dc.Resource(v1alpha1.GroupVersion.WithResource("sandboxes"))
	templates := dc.Resource(v1alpha1.GroupVersion.WithResource("sandboxtemplates"))
	return func(ctx context.Context, ns, host string) ([]unstructured.Unstructured, error) {
		list, err := sandboxes.Namespace(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("status.hostName", host).String()})
		if err != nil {
			return nil, err
		}
		tpls, err := templates.Namespace(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		return append(list.Items, tpls.Items...), nil
	}, nil
}
