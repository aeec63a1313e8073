package apiserver

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

// The default policy, installed and kept at every start of the API server
// (as kube-apiserver's bootstrap policy): the three tenant roles that
// `hearth user create --role` binds in a namespace, and what every
// authenticated user may do (discovery, and asking what it may do).

// tenantResources are hearth's namespaced resources, what tenants own.
var tenantResources = []string{"sandboxes", "snapshots", "sandboxtemplates", "warmpools", "routes", "networkpolicies", "migrations"}

var (
	readVerbs  = []string{"get", "list", "watch"}
	writeVerbs = []string{"create", "update", "patch", "delete", "deletecollection"}
)

func defaultClusterRoles() []rbacv1.ClusterRole {
	var hearthRead []string
	for _, r := range tenantResources {
		hearthRead = append(hearthRead, r)
		if r != "routes" && r != "networkpolicies" {
			hearthRead = append(hearthRead, r+"/status")
		}
	}
	hearthRead = append(hearthRead, "sandboxes/log", "warmpools/scale")
	hearth := v1alpha1.GroupVersion.Group
	view := []rbacv1.PolicyRule{
		{APIGroups: []string{hearth}, Resources: hearthRead, Verbs: readVerbs},
		{APIGroups: []string{""}, Resources: []string{"events", "resourcequotas", "limitranges"}, Verbs: readVerbs},
		// Bound in a namespace, this is that namespace only.
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get"}},
	}
	// Writes: not status, which is the system's (a tenant that set a
	// sandbox's host would steer its streams). Routes: a host name is the
	// namespace's that claimed it first (routeHostAdmission).
	edit := append(append([]rbacv1.PolicyRule(nil), view...),
		rbacv1.PolicyRule{APIGroups: []string{hearth}, Resources: tenantResources, Verbs: writeVerbs},
		rbacv1.PolicyRule{APIGroups: []string{hearth}, Resources: []string{"warmpools/scale"}, Verbs: []string{"update", "patch"}},
		rbacv1.PolicyRule{APIGroups: []string{hearth}, Resources: []string{"sandboxes/exec", "sandboxes/attach"}, Verbs: []string{"create", "get"}},
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: append(append([]string(nil), readVerbs...), writeVerbs...)},
	)
	admin := append(append([]rbacv1.PolicyRule(nil), edit...),
		rbacv1.PolicyRule{APIGroups: []string{rbacv1.GroupName}, Resources: []string{"roles", "rolebindings"},
			Verbs: append(append([]string(nil), readVerbs...), writeVerbs...)})
	return []rbacv1.ClusterRole{
		clusterRole("view", view),
		clusterRole("edit", edit),
		clusterRole("admin", admin),
		clusterRole("system:discovery", []rbacv1.PolicyRule{{
			NonResourceURLs: []string{"/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi", "/openapi/*", "/healthz", "/livez", "/readyz"},
			Verbs:           []string{"get"}}}),
		clusterRole(v1alpha1.NodeRole, nodeRules()),
		clusterRole("system:basic-user", []rbacv1.PolicyRule{{APIGroups: []string{"authorization.k8s.io"},
			Resources: []string{"selfsubjectaccessreviews", "selfsubjectrulesreviews"}, Verbs: []string{"create"}}}),
	}
}

// nodeRules are what node agents (group hearth:nodes) may do: read what
// they run and what their network policy needs (every sandbox, policy and
// namespace of the cluster), write the status of sandboxes, snapshots and
// templates, of the migrations they take part in, and the finalizers of
// sandboxes and snapshots, delete the warm
// pool member a claim took over, and keep their Host, Lease and events.
// Not Secrets, roles, or any spec a tenant wrote. Node restriction
// (noderestriction.go) then limits each node to its own objects.
func nodeRules() []rbacv1.PolicyRule {
	hearth := v1alpha1.GroupVersion.Group
	return []rbacv1.PolicyRule{
		{APIGroups: []string{hearth}, Resources: append([]string{"hosts"}, tenantResources...), Verbs: readVerbs},
		{APIGroups: []string{hearth}, Resources: []string{"sandboxes/status", "snapshots/status", "sandboxtemplates/status", "hosts/status", "migrations/status"}, Verbs: []string{"update", "patch"}},
		{APIGroups: []string{hearth}, Resources: []string{"sandboxes", "snapshots"}, Verbs: []string{"update", "patch"}},
		{APIGroups: []string{hearth}, Resources: []string{"sandboxes"}, Verbs: []string{"delete"}},
		{APIGroups: []string{hearth}, Resources: []string{"hosts"}, Verbs: []string{"create", "update", "patch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: readVerbs},
		{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "update", "patch"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "watch", "create", "update", "patch"}},
	}
}

func clusterRole(name string, rules []rbacv1.PolicyRule) rbacv1.ClusterRole {
	return rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: defaultPolicyLabels()}, Rules: rules}
}

func defaultPolicyLabels() map[string]string {
	return map[string]string{"kubernetes.io/bootstrapping": "rbac-defaults"}
}

func defaultClusterRoleBindings() []rbacv1.ClusterRoleBinding {
	var out []rbacv1.ClusterRoleBinding
	for name, group := range map[string]string{"system:discovery": user.AllAuthenticated, "system:basic-user": user.AllAuthenticated, v1alpha1.NodeRole: pki.GroupNodes} {
		out = append(out, rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: defaultPolicyLabels()},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
			Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: group}},
		})
	}
	return out
}

// autoupdate is the annotation by which an admin keeps a default role as
// edited ("false"), as in Kubernetes.
const autoupdate = "rbac.authorization.kubernetes.io/autoupdate"

// installPolicy creates the default roles and bindings, and puts back the
// rules of any that were changed (unless marked autoupdate: "false"); it
// returns once the authorizer sees them, so that a ready server (this is
// a post-start hook, part of /readyz) authorizes its node agents.
func installPolicy(ctx context.Context, cfg *rest.Config, acc *access, log *slog.Logger) error {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	roles := cs.RbacV1().ClusterRoles()
	for _, want := range defaultClusterRoles() {
		have, err := roles.Get(ctx, want.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			if _, err := roles.Create(ctx, &want, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("create ClusterRole %s: %w", want.Name, err)
			}
		case err != nil:
			return fmt.Errorf("ClusterRole %s: %w", want.Name, err)
		case have.Annotations[autoupdate] != "false" && !reflect.DeepEqual(have.Rules, want.Rules):
			log.Info("restoring the rules of a default ClusterRole", "name", want.Name)
			have.Rules = want.Rules
			if _, err := roles.Update(ctx, have, metav1.UpdateOptions{}); err != nil {
				return fmt.Errorf("update ClusterRole %s: %w", want.Name, err)
			}
		}
	}
	bindings := cs.RbacV1().ClusterRoleBindings()
	for _, want := range defaultClusterRoleBindings() {
		if _, err := bindings.Create(ctx, &want, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create ClusterRoleBinding %s: %w", want.Name, err)
		}
	}
	return wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		for _, r := range defaultClusterRoles() {
			if !acc.seen(r.Name, false) {
				return false, nil
			}
		}
		for _, b := range defaultClusterRoleBindings() {
			if !acc.seen(b.Name, true) {
				return false, nil
			}
		}
		return true, nil
	})
}
