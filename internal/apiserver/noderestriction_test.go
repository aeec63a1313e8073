package apiserver

import (
	"context"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/user"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

func TestNodeRestriction(t *testing.T) {
	sandbox := func(host string, command ...any) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{
			"metadata": map[string]any{"name": "s", "namespace": "team-a"},
			"spec":     map[string]any{"image": "x", "command": command},
			"status":   map[string]any{"hostName": host},
		}}
	}
	hearth := func(r string) schema.GroupVersionResource { return v1alpha1.GroupVersion.WithResource(r) }
	leases := schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}
	node := &user.DefaultInfo{Name: pki.NodeUserPrefix + "h1", Groups: []string{pki.GroupNodes}}
	for _, tc := range []struct {
		name     string
		who      user.Info
		op       admission.Operation
		res      schema.GroupVersionResource
		sub      string
		ns, obj  string
		new, old runtime.Object
		allow    bool
	}{
		{"its sandbox's status", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h1"), sandbox("h1"), true},
		{"unbinds its sandbox", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox(""), sandbox("h1"), true},
		{"another host's sandbox", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h1"), sandbox("h2"), false},
		{"binds to another host", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h2"), sandbox("h1"), false},
		{"an unbound sandbox", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h1"), sandbox(""), false},
		{"its sandbox's spec", node, admission.Update, hearth("sandboxes"), "", "team-a", "s", sandbox("h1", "evil"), sandbox("h1"), false},
		{"deletes its own", node, admission.Delete, hearth("sandboxes"), "", "team-a", "s", nil, sandbox("h1"), true},
		{"deletes another's", node, admission.Delete, hearth("sandboxes"), "", "team-a", "s", nil, sandbox("h2"), false},
		{"its Host", node, admission.Update, hearth("hosts"), "status", "", "h1", nil, nil, true},
		{"another Host", node, admission.Update, hearth("hosts"), "", "", "h2", nil, nil, false},
		{"its Lease", node, admission.Update, leases, "", v1alpha1.LeaseNamespace, "h1", nil, nil, true},
		{"the controllers' Lease", node, admission.Update, leases, "", "hearth-system", "hearth-controllers", nil, nil, false},
		{"a node without a node's name", &user.DefaultInfo{Name: "alice", Groups: []string{pki.GroupNodes}}, admission.Update, hearth("hosts"), "", "", "alice", nil, nil, false},
		{"the admin", &user.DefaultInfo{Name: "hearth-admin", Groups: []string{pki.GroupAdmin}}, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h2"), sandbox("h1"), true},
	} {
		a := admission.NewAttributesRecord(tc.new, tc.old, schema.GroupVersionKind{}, tc.ns, tc.obj, tc.res, tc.sub, tc.op, nil, false, tc.who)
		err := nodeRestriction{}.Validate(context.Background(), a, nil)
		if (err == nil) != tc.allow {
			t.Errorf("%s: %v, want allowed %v", tc.name, err, tc.allow)
		}
	}
}
