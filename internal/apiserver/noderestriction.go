package apiserver

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apiserver/pkg/admission"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

// nodeRestriction is a validating admission plugin, as kube-apiserver's
// NodeRestriction: RBAC lets node agents (group hearth:nodes) write
// sandboxes' status, Hosts and Leases at all; this limits each node
// (user hearth-node:NAME) to its own. A node may change only the status,
// finalizers and annotations of a sandbox bound to it, bind it to no
// other host, delete only one bound to it (the warm pool member a claim
// took over), and write only its own Host and its own Lease. So a node
// taken over cannot steer another host's sandboxes (and their exec
// streams) to itself, nor mark other hosts down, nor touch the
// controllers' leader lease.
type nodeRestriction struct{}

var _ admission.ValidationInterface = nodeRestriction{}

func (nodeRestriction) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update || op == admission.Delete
}

func (nodeRestriction) Validate(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	u := a.GetUserInfo()
	if u == nil || !slices.Contains(u.GetGroups(), pki.GroupNodes) {
		return nil
	}
	node, ok := strings.CutPrefix(u.GetName(), pki.NodeUserPrefix)
	if !ok || node == "" {
		return admission.NewForbidden(a, fmt.Errorf("%q is in %s but is not named %sHOST", u.GetName(), pki.GroupNodes, pki.NodeUserPrefix))
	}
	if err := nodeMay(node, a); err != nil {
		return admission.NewForbidden(a, fmt.Errorf("node %s: %w", node, err))
	}
	return nil
}

// nodeMay is the decision: nil if node may make the request.
func nodeMay(node string, a admission.Attributes) error {
	gr := a.GetResource().GroupResource()
	switch {
	case gr.Group == v1alpha1.GroupVersion.Group && gr.Resource == "hosts":
		if a.GetName() != node {
			return fmt.Errorf("may write its own Host only, not %s", a.GetName())
		}
	case gr.Group == "coordination.k8s.io" && gr.Resource == "leases":
		if a.GetNamespace() != v1alpha1.LeaseNamespace || a.GetName() != node {
			return fmt.Errorf("may write its own Lease only (%s/%s), not %s/%s", v1alpha1.LeaseNamespace, node, a.GetNamespace(), a.GetName())
		}
	case gr.Group == v1alpha1.GroupVersion.Group && gr.Resource == "sandboxes":
		old, _ := a.GetOldObject().(*unstructured.Unstructured)
		if old == nil || boundTo(old) != node {
			return fmt.Errorf("sandbox %s/%s is not bound to it", a.GetNamespace(), a.GetName())
		}
		if a.GetOperation() != admission.Update {
			return nil // a delete of its own
		}
		obj, _ := a.GetObject().(*unstructured.Unstructured)
		if obj == nil {
			return fmt.Errorf("sandbox %s/%s: no object", a.GetNamespace(), a.GetName())
		}
		if h := boundTo(obj); h != node && h != "" {
			return fmt.Errorf("may not bind sandbox %s/%s to host %s", a.GetNamespace(), a.GetName(), h)
		}
		if !reflect.DeepEqual(obj.Object["spec"], old.Object["spec"]) || !reflect.DeepEqual(obj.GetLabels(), old.GetLabels()) {
			return fmt.Errorf("may not change the spec or labels of sandbox %s/%s", a.GetNamespace(), a.GetName())
		}
	}
	return nil
}

func boundTo(u *unstructured.Unstructured) string {
	h, _, _ := unstructured.NestedString(u.Object, "status", "hostName")
	return h
}
