package apiserver

import (
	"context"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	clientgoinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"hearth.dev/hearth/internal/pki"
)

// TestDefaultPolicy: Kubernetes' RBAC authorizer over hearth's default
// roles decides as the roles say: a tenant's role applies in its own
// namespace only, view cannot exec or read secrets, nodes keep status and
// cannot read secrets or write specs they do not own, the admin may all.
func TestDefaultPolicy(t *testing.T) {
	var objs []runtime.Object
	for _, r := range defaultClusterRoles() {
		objs = append(objs, &r)
	}
	for _, b := range defaultClusterRoleBindings() {
		objs = append(objs, &b)
	}
	bind := func(ns, u, role string) *rbacv1.RoleBinding {
		return &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: u + "-" + role},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
			Subjects: []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: u}}}
	}
	objs = append(objs, bind("team-a", "alice", "edit"), bind("team-b", "bob", "admin"), bind("team-a", "vera", "view"))
	informers := clientgoinformers.NewSharedInformerFactory(fake.NewClientset(objs...), 0)
	acc, err := newAccess(informers, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	informers.Start(ctx.Done())
	informers.WaitForCacheSync(ctx.Done())

	users := map[string]user.Info{
		"alice":  &user.DefaultInfo{Name: "alice", Groups: []string{user.AllAuthenticated}},
		"bob":    &user.DefaultInfo{Name: "bob", Groups: []string{user.AllAuthenticated}},
		"vera":   &user.DefaultInfo{Name: "vera", Groups: []string{user.AllAuthenticated}},
		"node":   &user.DefaultInfo{Name: "hearth-node:h1", Groups: []string{pki.GroupNodes, user.AllAuthenticated}},
		"admin":  &user.DefaultInfo{Name: "hearth-admin", Groups: []string{pki.GroupAdmin, user.AllAuthenticated}},
		"nobody": &user.DefaultInfo{Name: "mallory", Groups: []string{user.AllAuthenticated}},
	}
	res := func(verb, ns, group, resource, sub string) authorizer.AttributesRecord {
		return authorizer.AttributesRecord{Verb: verb, Namespace: ns, APIGroup: group, APIVersion: "v1", Resource: resource, Subresource: sub, ResourceRequest: true}
	}
	for _, tc := range []struct {
		who   string
		attrs authorizer.AttributesRecord
		allow bool
	}{
		{"alice", res("create", "team-a", "hearth.dev", "sandboxes", ""), true},
		{"alice", res("create", "team-a", "hearth.dev", "sandboxes", "exec"), true},
		{"alice", res("get", "team-a", "", "secrets", ""), true},
		{"alice", res("list", "team-b", "hearth.dev", "sandboxes", ""), false},
		{"alice", res("create", "team-b", "hearth.dev", "sandboxes", "exec"), false},
		{"alice", res("list", "", "hearth.dev", "sandboxes", ""), false}, // all namespaces
		{"alice", res("update", "team-a", "hearth.dev", "sandboxes", "status"), false},
		{"alice", res("create", "team-a", "rbac.authorization.k8s.io", "rolebindings", ""), false},
		{"alice", res("update", "", "hearth.dev", "hosts", ""), false},
		{"vera", res("get", "team-a", "hearth.dev", "sandboxes", "log"), true},
		{"vera", res("create", "team-a", "hearth.dev", "sandboxes", "exec"), false},
		{"vera", res("get", "team-a", "", "secrets", ""), false},
		{"vera", res("delete", "team-a", "hearth.dev", "sandboxes", ""), false},
		{"bob", res("create", "team-b", "rbac.authorization.k8s.io", "rolebindings", ""), true},
		{"bob", res("create", "team-a", "hearth.dev", "sandboxes", ""), false},
		{"nobody", res("list", "team-a", "hearth.dev", "sandboxes", ""), false},
		{"nobody", res("create", "", "authorization.k8s.io", "selfsubjectaccessreviews", ""), true},
		{"nobody", authorizer.AttributesRecord{Verb: "get", Path: "/apis/hearth.dev/v1alpha1"}, true},
		{"node", res("update", "team-a", "hearth.dev", "sandboxes", "status"), true},
		{"node", res("watch", "", "hearth.dev", "sandboxes", ""), true},
		{"node", res("create", "", "hearth.dev", "hosts", ""), true},
		{"node", res("get", "team-a", "", "secrets", ""), false},
		{"node", res("create", "team-a", "hearth.dev", "sandboxes", ""), false},
		{"node", res("create", "team-a", "rbac.authorization.k8s.io", "rolebindings", ""), false},
		{"admin", res("delete", "team-b", "", "secrets", ""), true},
	} {
		tc.attrs.User = users[tc.who]
		d, reason, err := acc.authorizer.Authorize(ctx, tc.attrs)
		if got := d == authorizer.DecisionAllow; got != tc.allow || err != nil {
			t.Errorf("%s %s %s/%s/%s in %q: allowed %v (%s, %v), want %v", tc.who, tc.attrs.Verb, tc.attrs.APIGroup,
				tc.attrs.Resource, tc.attrs.Subresource, tc.attrs.Namespace, got, reason, err, tc.allow)
		}
	}
}
