package apiserver

import (
	"context"
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"

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
	template := func(hosts ...string) *unstructured.Unstructured {
		var entries []any
		for _, h := range hosts {
			entries = append(entries, map[string]any{"name": h, "ready": true})
		}
		return &unstructured.Unstructured{Object: map[string]any{
			"metadata": map[string]any{"name": "t", "namespace": "team-a"},
			"spec":     map[string]any{"image": "x"},
			"status":   map[string]any{"hosts": entries},
		}}
	}
	host := func(unschedulable bool) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{"metadata": map[string]any{"name": "h1"},
			"spec": map[string]any{"unschedulable": unschedulable}}}
	}
	withIP := func(host, ip string) *unstructured.Unstructured {
		sb := sandbox(host)
		sb.Object["status"].(map[string]any)["ip"] = ip
		return sb
	}
	migration := func(src, dst, phase string) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{
			"metadata": map[string]any{"name": "m", "namespace": "team-a"},
			"spec":     map[string]any{"sandbox": "s"},
			"status":   map[string]any{"sourceHost": src, "targetHost": dst, "phase": phase},
		}}
	}
	with := func(u *unstructured.Unstructured, k string, v any) *unstructured.Unstructured {
		u.Object["status"].(map[string]any)[k] = v
		return u
	}
	// h1's range is 10.244.1.0/24; h3 has none.
	restriction := nodeRestriction{hostRange: func(_ context.Context, host string) (string, error) {
		switch host {
		case "h1":
			return "10.244.1.0/24", nil
		case "h3":
			return "", nil
		}
		return "", errors.New("no such host")
	}}
	hearth := func(r string) schema.GroupVersionResource { return v1alpha1.GroupVersion.WithResource(r) }
	leases := schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}
	node := &user.DefaultInfo{Name: pki.NodeUserPrefix + "h1", Groups: []string{pki.GroupNodes}}
	node3 := &user.DefaultInfo{Name: pki.NodeUserPrefix + "h3", Groups: []string{pki.GroupNodes}}
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
		{"an address of its range", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "10.244.1.7"), sandbox("h1"), true},
		{"the same address again", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "10.244.1.7"), withIP("h1", "10.244.1.7"), true},
		{"clears the address", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h1"), withIP("h1", "10.244.1.7"), true},
		{"another host's address", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "10.244.2.7"), sandbox("h1"), false},
		{"its gateway", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "10.244.1.1"), sandbox("h1"), false},
		{"its broadcast", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "10.244.1.255"), sandbox("h1"), false},
		{"not an address", node, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h1", "evil"), sandbox("h1"), false},
		{"a host without a range", node3, admission.Update, hearth("sandboxes"), "status", "team-a", "s", withIP("h3", "10.244.1.7"), sandbox("h3"), false},
		{"deletes its own", node, admission.Delete, hearth("sandboxes"), "", "team-a", "s", nil, sandbox("h1"), true},
		{"deletes another's", node, admission.Delete, hearth("sandboxes"), "", "team-a", "s", nil, sandbox("h2"), false},
		{"its Host", node, admission.Update, hearth("hosts"), "status", "", "h1", nil, nil, true},
		{"its Host's labels", node, admission.Update, hearth("hosts"), "", "", "h1", host(true), host(true), true},
		{"uncordons itself", node, admission.Update, hearth("hosts"), "", "", "h1", host(false), host(true), false},
		{"another Host", node, admission.Update, hearth("hosts"), "", "", "h2", nil, nil, false},
		{"claims a snapshot", node, admission.Update, hearth("snapshots"), "status", "team-a", "s", sandbox("h1"), sandbox(""), true},
		{"another host's snapshot", node, admission.Update, hearth("snapshots"), "status", "team-a", "s", sandbox("h1"), sandbox("h2"), false},
		{"its template entry", node, admission.Update, hearth("sandboxtemplates"), "status", "team-a", "t", template("h2", "h1"), template("h2"), true},
		{"another host's template entry", node, admission.Update, hearth("sandboxtemplates"), "status", "team-a", "t", template("h1"), template("h2"), false},
		{"a template's spec", node, admission.Update, hearth("sandboxtemplates"), "", "team-a", "t", template(), template(), false},
		{"fails a migration from it", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h1", "h2", "Failed"), migration("h1", "h2", "Copying"), true},
		{"its figures as the source", node, admission.Update, hearth("migrations"), "status", "team-a", "m", with(migration("h1", "h2", "Succeeded"), "bytes", int64(7)), migration("h1", "h2", "Succeeded"), true},
		{"the source succeeds it", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h1", "h2", "Succeeded"), migration("h1", "h2", "Copying"), false},
		{"the target succeeds it", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h2", "h1", "Succeeded"), migration("h2", "h1", "Copying"), true},
		{"the target gives its address", node, admission.Update, hearth("migrations"), "status", "team-a", "m", with(migration("h2", "h1", "Copying"), "targetIP", "10.244.1.9"), migration("h2", "h1", "Preparing"), true},
		{"an address changed later", node, admission.Update, hearth("migrations"), "status", "team-a", "m", with(migration("h2", "h1", "Succeeded"), "targetIP", "10.244.1.9"), migration("h2", "h1", "Copying"), false},
		{"revives a failed one", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h2", "h1", "Succeeded"), migration("h2", "h1", "Failed"), false},
		{"another sandbox", node, admission.Update, hearth("migrations"), "status", "team-a", "m", with(migration("h2", "h1", "Copying"), "sandboxUID", "other"), migration("h2", "h1", "Copying"), false},
		{"marks it bound", node, admission.Update, hearth("migrations"), "status", "team-a", "m", with(migration("h2", "h1", "Succeeded"), "bound", true), migration("h2", "h1", "Succeeded"), false},
		{"another hosts' migration", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h2", "h3", "Failed"), migration("h2", "h3", "Copying"), false},
		{"steers a migration to itself", node, admission.Update, hearth("migrations"), "status", "team-a", "m", migration("h2", "h1", "Copying"), migration("h2", "h3", "Copying"), false},
		{"a migration's spec", node, admission.Update, hearth("migrations"), "", "team-a", "m", migration("h1", "h2", "Copying"), migration("h1", "h2", "Copying"), false},
		{"creates a migration", node, admission.Create, hearth("migrations"), "", "team-a", "m", migration("", "", ""), nil, false},
		{"its Lease", node, admission.Update, leases, "", v1alpha1.LeaseNamespace, "h1", nil, nil, true},
		{"the controllers' Lease", node, admission.Update, leases, "", "hearth-system", "hearth-controllers", nil, nil, false},
		{"a node without a node's name", &user.DefaultInfo{Name: "alice", Groups: []string{pki.GroupNodes}}, admission.Update, hearth("hosts"), "", "", "alice", nil, nil, false},
		{"the admin", &user.DefaultInfo{Name: "hearth-admin", Groups: []string{pki.GroupAdmin}}, admission.Update, hearth("sandboxes"), "status", "team-a", "s", sandbox("h2"), sandbox("h1"), true},
	} {
		a := admission.NewAttributesRecord(tc.new, tc.old, schema.GroupVersionKind{}, tc.ns, tc.obj, tc.res, tc.sub, tc.op, nil, false, tc.who)
		err := restriction.Validate(context.Background(), a, nil)
		if (err == nil) != tc.allow {
			t.Errorf("%s: %v, want allowed %v", tc.name, err, tc.allow)
		}
	}
}

// TestLocalImageAdmission: a tenant may not name files on the node as an
// image; the admin may, and others may then write that object (a node
// its finalizers) as long as they do not change the image.
func TestLocalImageAdmission(t *testing.T) {
	sb := func(image string) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{"spec": map[string]any{"image": image}}}
	}
	res := v1alpha1.GroupVersion.WithResource("sandboxes")
	tenant := &user.DefaultInfo{Name: "alice", Groups: []string{user.AllAuthenticated}}
	admin := &user.DefaultInfo{Name: "hearth-admin", Groups: []string{user.SystemPrivilegedGroup}}
	node := &user.DefaultInfo{Name: pki.NodeUserPrefix + "h1", Groups: []string{pki.GroupNodes}}
	for _, tc := range []struct {
		name     string
		who      user.Info
		op       admission.Operation
		new, old runtime.Object
		allow    bool
	}{
		{"a tenant's registry image", tenant, admission.Create, sb("registry.example/x:1"), nil, true},
		{"a tenant's archive", tenant, admission.Create, sb("docker-archive:/etc/shadow"), nil, false},
		{"a tenant's layout", tenant, admission.Create, sb("oci:/tmp/x:1"), nil, false},
		{"a tenant changes to a layout", tenant, admission.Update, sb("oci:/tmp/x:1"), sb("registry.example/x:1"), false},
		{"the admin's layout", admin, admission.Create, sb("oci:/tmp/x:1"), nil, true},
		{"a node's finalizer on it", node, admission.Update, sb("oci:/tmp/x:1"), sb("oci:/tmp/x:1"), true},
	} {
		a := admission.NewAttributesRecord(tc.new, tc.old, schema.GroupVersionKind{}, "team-a", "s", res, "", tc.op, nil, false, tc.who)
		err := imageAdmission{}.Validate(context.Background(), a, nil)
		if (err == nil) != tc.allow {
			t.Errorf("%s: %v, want allowed %v", tc.name, err, tc.allow)
		}
	}
	// With a registry allowlist.
	ia := imageAdmission{allowed: []string{"registry.example", "index.docker.io", "10.0.0.5:5000"}}
	for ref, allow := range map[string]bool{
		"registry.example/x:1": true, "registry.example:443/x:1": true, "busybox:1.36": true, "10.0.0.5:5000/x": true,
		"evil.example/x:1": false, "10.0.0.5:6000/x": false, "Not A Ref!!": false,
	} {
		a := admission.NewAttributesRecord(sb(ref), nil, schema.GroupVersionKind{}, "team-a", "s", res, "", admission.Create, nil, false, tenant)
		err := ia.Validate(context.Background(), a, nil)
		if (err == nil) != allow {
			t.Errorf("%s with an allowlist: %v, want allowed %v", ref, err, allow)
		}
		if ref == "evil.example/x:1" && (err == nil || !strings.Contains(err.Error(), "registry evil.example is not one this cluster pulls from")) {
			t.Errorf("the allowlist's refusal: %v", err)
		}
	}
	a := admission.NewAttributesRecord(sb("evil.example/x:1"), nil, schema.GroupVersionKind{}, "team-a", "s", res, "", admission.Create, nil, false, admin)
	if err := ia.Validate(context.Background(), a, nil); err != nil {
		t.Errorf("the admin's image is not checked: %v", err)
	}
}

func TestRouteHostAdmission(t *testing.T) {
	route := func(host string) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{"spec": map[string]any{"host": host}}}
	}
	// app.example.test is team-a's; shared.example.test team-b's too.
	claims := map[string][]types.NamespacedName{
		"app.example.test": {{Namespace: "team-a", Name: "web"}},
	}
	r := routeHostAdmission{claims: func(_ context.Context, host string) ([]types.NamespacedName, error) {
		if host == "broken.example.test" {
			return nil, errors.New("etcd is away")
		}
		return claims[host], nil
	}, domain: "hearth.example",
		namespace: func(_ context.Context, name string) (*corev1.Namespace, error) {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
			if name == "team-c" {
				ns.Annotations = map[string]string{v1alpha1.AnnotationRouteHosts: "c.example.test, .c-apps.example.test"}
			}
			return ns, nil
		}}
	res := v1alpha1.GroupVersion.WithResource("routes")
	who := &user.DefaultInfo{Name: "bob"}
	for _, tc := range []struct {
		name     string
		ns       string
		op       admission.Operation
		new, old runtime.Object
		allow    bool
	}{
		{"a free host", "team-b", admission.Create, route("new.example.test"), nil, true},
		{"its own namespace's host", "team-a", admission.Create, route("app.example.test"), nil, true},
		{"another namespace's host", "team-b", admission.Create, route("app.example.test"), nil, false},
		{"changed to another namespace's host", "team-b", admission.Update, route("app.example.test"), route("b.example.test"), false},
		{"an update that keeps the host", "team-b", admission.Update, route("legacy.example.test"), route("legacy.example.test"), true},
		{"the owners cannot be read", "team-b", admission.Create, route("broken.example.test"), nil, false},
		{"a name of the ingress's domain", "team-b", admission.Create, route("80-web-team-a.hearth.example"), nil, false},
		{"the ingress's domain in capitals", "team-b", admission.Create, route("HEARTH.EXAMPLE"), nil, false},
		{"a name its namespace lists", "team-c", admission.Create, route("c.example.test"), nil, true},
		{"a name under a suffix its namespace lists", "team-c", admission.Create, route("x.c-apps.example.test"), nil, true},
		{"a name its namespace does not list", "team-c", admission.Create, route("new.example.test"), nil, false},
		{"a name that only ends like a listed suffix", "team-c", admission.Create, route("evilc-apps.example.test"), nil, false},
	} {
		a := admission.NewAttributesRecord(tc.new, tc.old, schema.GroupVersionKind{}, tc.ns, "r", res, "", tc.op, nil, false, who)
		err := r.Validate(context.Background(), a, nil)
		if (err == nil) != tc.allow {
			t.Errorf("%s: %v, want allowed %v", tc.name, err, tc.allow)
		}
		if err != nil && !tc.allow && tc.name == "another namespace's host" && !strings.Contains(err.Error(), `spec.host "app.example.test" belongs to another namespace`) {
			t.Errorf("%s: the message %q does not name the field and the host", tc.name, err)
		}
	}
}

func TestNodeSecrets(t *testing.T) {
	obj := func(kind, name string, secrets ...string) unstructured.Unstructured {
		var refs []any
		for _, s := range secrets {
			refs = append(refs, map[string]any{"name": s})
		}
		return unstructured.Unstructured{Object: map[string]any{"kind": kind, "metadata": map[string]any{"name": name},
			"spec": map[string]any{"imagePullSecrets": refs}}}
	}
	// h1 runs team-a's s1, which pulls with "pull"; h2 runs nothing there;
	// team-c's template, which every host builds, pulls with "tpl".
	n := nodeSecrets{pullers: func(_ context.Context, ns, host string) ([]unstructured.Unstructured, error) {
		switch {
		case ns == "team-a" && host == "h1":
			return []unstructured.Unstructured{obj("Sandbox", "s1", "pull")}, nil
		case ns == "team-c":
			return []unstructured.Unstructured{obj("SandboxTemplate", "t", "tpl")}, nil
		}
		return nil, nil
	}}
	node := func(host string) user.Info {
		return &user.DefaultInfo{Name: pki.NodeUserPrefix + host, Groups: []string{pki.GroupNodes}}
	}
	for _, tc := range []struct {
		name     string
		who      user.Info
		verb, ns string
		secret   string
		allow    bool
	}{
		{"its sandbox's pull secret", node("h1"), "get", "team-a", "pull", true},
		{"another secret of the namespace", node("h1"), "get", "team-a", "tls", false},
		{"listing secrets", node("h1"), "list", "team-a", "", false},
		{"another node", node("h2"), "get", "team-a", "pull", false},
		{"another namespace", node("h1"), "get", "team-b", "pull", false},
		{"a user named like a node", &user.DefaultInfo{Name: pki.NodeUserPrefix + "h1"}, "get", "team-a", "pull", false},
		{"a template's pull secret", node("h2"), "get", "team-c", "tpl", true},
		{"another secret of the template's namespace", node("h2"), "get", "team-c", "pull", false},
	} {
		a := authorizer.AttributesRecord{User: tc.who, Verb: tc.verb, Namespace: tc.ns, Resource: "secrets", Name: tc.secret, ResourceRequest: true}
		d, _, err := n.Authorize(context.Background(), a)
		if err != nil || (d == authorizer.DecisionAllow) != tc.allow {
			t.Errorf("%s: %v %v, want allowed %v", tc.name, d, err, tc.allow)
		}
	}
}
