package apiserver

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network/ipam"
	"hearth.dev/hearth/internal/pki"
)

// nodeRestriction is a validating admission plugin, as kube-apiserver's
// NodeRestriction: RBAC lets node agents (group hearth:nodes) write
// sandboxes', snapshots' and templates' status, Hosts and Leases at all;
// this limits each node (user hearth-node:NAME) to its own. A node may
// change only the status, finalizers and annotations of a sandbox bound
// to it, bind it to no other host, delete only one bound to it (the warm
// pool member a claim took over); the same of a snapshot unclaimed or its
// own; the status of a migration it is the source or target of, not who
// those are; only its own entry of a template's status; its own Host, not its
// spec; and its own Lease. So a node taken over cannot steer another
// host's sandboxes or snapshots (and their exec streams) to itself,
// rewrite a template other hosts boot, uncordon itself, mark other hosts
// down, or touch the controllers' leader lease. The address a node gives
// a sandbox (status.ip) must be of its own Host's range: a node cannot
// claim another sandbox's address, which policies, DNS and the ingress
// take as that sandbox's.
type nodeRestriction struct {
	// hostRange is a Host's spec.sandboxCIDR ("": none).
	hostRange func(ctx context.Context, host string) (string, error)
}

var _ admission.ValidationInterface = nodeRestriction{}

func (nodeRestriction) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update || op == admission.Delete
}

func (n nodeRestriction) Validate(ctx context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
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
	if ip, changed := newSandboxIP(a); changed && ip != "" {
		cidr, err := n.hostRange(ctx, node)
		if err != nil {
			return admission.NewForbidden(a, fmt.Errorf("node %s: its Host's sandbox range: %w", node, err))
		}
		if err := ipam.CheckSandboxAddr(ip, cidr); err != nil {
			return admission.NewForbidden(a, fmt.Errorf("node %s: sandbox %s/%s: status.ip %w", node, a.GetNamespace(), a.GetName(), err))
		}
	}
	return nil
}

// newSandboxIP is the status.ip a sandbox update writes, and whether it
// differs from the old one.
func newSandboxIP(a admission.Attributes) (string, bool) {
	gr := a.GetResource().GroupResource()
	obj, _ := a.GetObject().(*unstructured.Unstructured)
	old, _ := a.GetOldObject().(*unstructured.Unstructured)
	if gr != v1alpha1.GroupVersion.WithResource("sandboxes").GroupResource() || a.GetOperation() != admission.Update || obj == nil || old == nil {
		return "", false
	}
	ip, _, _ := unstructured.NestedString(obj.Object, "status", "ip")
	was, _, _ := unstructured.NestedString(old.Object, "status", "ip")
	return ip, ip != was
}

// hostRanges reads Hosts' spec.sandboxCIDR through the API (the loopback
// client).
func hostRanges(cfg *rest.Config) (func(ctx context.Context, host string) (string, error), error) {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	hosts := dc.Resource(v1alpha1.GroupVersion.WithResource("hosts"))
	return func(ctx context.Context, host string) (string, error) {
		h, err := hosts.Get(ctx, host, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		cidr, _, _ := unstructured.NestedString(h.Object, "spec", "sandboxCIDR")
		return cidr, nil
	}, nil
}

// nodeMay is the decision: nil if node may make the request.
func nodeMay(node string, a admission.Attributes) error {
	gr := a.GetResource().GroupResource()
	obj, _ := a.GetObject().(*unstructured.Unstructured)
	old, _ := a.GetOldObject().(*unstructured.Unstructured)
	hearth := gr.Group == v1alpha1.GroupVersion.Group
	switch {
	case hearth && gr.Resource == "hosts":
		if a.GetName() != node {
			return fmt.Errorf("may write its own Host only, not %s", a.GetName())
		}
		// The spec (cordon, taints, overcommit) is the operator's.
		switch {
		case a.GetOperation() == admission.Create && obj != nil && len(specOf(obj)) > 0:
			return fmt.Errorf("may not give its Host a spec")
		case a.GetOperation() == admission.Update && a.GetSubresource() == "" && (obj == nil || old == nil || !reflect.DeepEqual(obj.Object["spec"], old.Object["spec"])):
			return fmt.Errorf("may not change its Host's spec")
		}
	case hearth && gr.Resource == "snapshots":
		// A snapshot of a sandbox bound to it: unclaimed, or claimed by
		// it. Status, finalizers, annotations; not the spec.
		if old == nil || obj == nil {
			return fmt.Errorf("snapshot %s/%s: may not create or delete snapshots", a.GetNamespace(), a.GetName())
		}
		if h := boundTo(old); h != node && h != "" {
			return fmt.Errorf("snapshot %s/%s is host %s's", a.GetNamespace(), a.GetName(), h)
		}
		if h := boundTo(obj); h != node && h != "" {
			return fmt.Errorf("may not give snapshot %s/%s to host %s", a.GetNamespace(), a.GetName(), h)
		}
		if changedSpecOrLabels(obj, old) {
			return fmt.Errorf("may not change the spec or labels of snapshot %s/%s", a.GetNamespace(), a.GetName())
		}
	case hearth && gr.Resource == "sandboxtemplates":
		// Its own entry of the template's hosts, and nothing else.
		if a.GetSubresource() != "status" || old == nil || obj == nil {
			return fmt.Errorf("template %s/%s: may write only its own entry of the status", a.GetNamespace(), a.GetName())
		}
		if !reflect.DeepEqual(otherHosts(obj, node), otherHosts(old, node)) {
			return fmt.Errorf("template %s/%s: may not change other hosts' entries", a.GetNamespace(), a.GetName())
		}
	case hearth && gr.Resource == "migrations":
		if a.GetSubresource() != "status" || old == nil || obj == nil {
			return fmt.Errorf("migration %s/%s: may write only its status", a.GetNamespace(), a.GetName())
		}
		if changedSpecOrLabels(obj, old) {
			return fmt.Errorf("migration %s/%s: may not change its spec or labels", a.GetNamespace(), a.GetName())
		}
		if err := migrationStep(node, statusOf(old), statusOf(obj)); err != nil {
			return fmt.Errorf("migration %s/%s: %w", a.GetNamespace(), a.GetName(), err)
		}
	case gr.Group == "coordination.k8s.io" && gr.Resource == "leases":
		if a.GetNamespace() != v1alpha1.LeaseNamespace || a.GetName() != node {
			return fmt.Errorf("may write its own Lease only (%s/%s), not %s/%s", v1alpha1.LeaseNamespace, node, a.GetNamespace(), a.GetName())
		}
	case hearth && gr.Resource == "sandboxes":
		if old == nil || boundTo(old) != node {
			return fmt.Errorf("sandbox %s/%s is not bound to it", a.GetNamespace(), a.GetName())
		}
		if a.GetOperation() != admission.Update {
			return nil // a delete of its own
		}
		if obj == nil {
			return fmt.Errorf("sandbox %s/%s: no object", a.GetNamespace(), a.GetName())
		}
		if h := boundTo(obj); h != node && h != "" {
			return fmt.Errorf("may not bind sandbox %s/%s to host %s", a.GetNamespace(), a.GetName(), h)
		}
		if changedSpecOrLabels(obj, old) {
			return fmt.Errorf("may not change the spec or labels of sandbox %s/%s", a.GetNamespace(), a.GetName())
		}
	}
	return nil
}

func statusOf(u *unstructured.Unstructured) map[string]any {
	m, _, _ := unstructured.NestedMap(u.Object, "status")
	return m
}

// migrationStep is the decision on a node's write of a migration's
// status (old to new): nil if node may make it. The control plane's
// fields (who the hosts are, the sandbox, the start, the binding) are
// not a node's; a migration that has ended stays ended; the target takes
// it from Preparing to Copying (giving the address) and from Copying to
// Succeeded; either may fail it while it is under way; the source reports
// the transfer's figures.
func migrationStep(node string, old, cur map[string]any) error {
	str := func(m map[string]any, k string) string { s, _ := m[k].(string); return s }
	src, dst := str(old, "sourceHost"), str(old, "targetHost")
	if node != src && node != dst {
		return fmt.Errorf("it is between %q and %q", src, dst)
	}
	for _, k := range []string{"sourceHost", "targetHost", "sandboxUID", "startedAt", "bound"} {
		if !reflect.DeepEqual(old[k], cur[k]) {
			return fmt.Errorf("may not change status.%s", k)
		}
	}
	from, to := v1alpha1.MigrationPhase(str(old, "phase")), v1alpha1.MigrationPhase(str(cur, "phase"))
	underway := from == v1alpha1.MigrationPreparing || from == v1alpha1.MigrationCopying
	switch {
	case from == to:
		// The source's figures, while it copies or once it has switched.
		if node != src || (from != v1alpha1.MigrationCopying && from != v1alpha1.MigrationSucceeded) {
			return fmt.Errorf("may not change a %s migration's status", orNone(string(from)))
		}
		for k := range mergedKeys(old, cur) {
			switch k {
			case "downtimeMillis", "totalMillis", "bytes", "rounds":
			default:
				if !reflect.DeepEqual(old[k], cur[k]) {
					return fmt.Errorf("may not change status.%s", k)
				}
			}
		}
		return nil
	case to == v1alpha1.MigrationFailed && underway:
	case node == dst && from == v1alpha1.MigrationPreparing && to == v1alpha1.MigrationCopying:
		return nil // with its address
	case node == dst && from == v1alpha1.MigrationCopying && to == v1alpha1.MigrationSucceeded:
	default:
		return fmt.Errorf("may not take a migration from %s to %s", orNone(string(from)), orNone(string(to)))
	}
	if !reflect.DeepEqual(old["targetIP"], cur["targetIP"]) {
		return fmt.Errorf("may not change status.targetIP")
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "no phase"
	}
	return s
}

func mergedKeys(a, b map[string]any) map[string]bool {
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	return keys
}

// changedSpecOrLabels says whether an update changes what a tenant wrote.
func changedSpecOrLabels(obj, old *unstructured.Unstructured) bool {
	return !reflect.DeepEqual(obj.Object["spec"], old.Object["spec"]) || !reflect.DeepEqual(obj.GetLabels(), old.GetLabels())
}

func specOf(u *unstructured.Unstructured) map[string]any {
	m, _, _ := unstructured.NestedMap(u.Object, "spec")
	return m
}

// otherHosts are a template's status entries of hosts other than node.
func otherHosts(u *unstructured.Unstructured, node string) []any {
	hosts, _, _ := unstructured.NestedSlice(u.Object, "status", "hosts")
	var out []any
	for _, h := range hosts {
		if m, ok := h.(map[string]any); !ok || m["name"] != node {
			out = append(out, h)
		}
	}
	return out
}

func boundTo(u *unstructured.Unstructured) string {
	h, _, _ := unstructured.NestedString(u.Object, "status", "hostName")
	return h
}
