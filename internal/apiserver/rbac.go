package apiserver

import (
	"context"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/validation/path"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/authorization/union"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	clientgoinformers "k8s.io/client-go/informers"
	rbacinternal "k8s.io/kubernetes/pkg/apis/rbac"
	rbacregistry "k8s.io/kubernetes/pkg/registry/rbac"
	rbacvalidation "k8s.io/kubernetes/pkg/registry/rbac/validation"
	rbacauthorizer "k8s.io/kubernetes/plugin/pkg/auth/authorizer/rbac"

	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
)

// RBAC: the rbac.authorization.k8s.io/v1 Roles, ClusterRoles and their
// bindings are served by the core server, and every request is authorized
// by Kubernetes' own RBAC authorizer (k8s.io/kubernetes/plugin/pkg/auth/
// authorizer/rbac) reading them from informers, after the privileged group
// system:masters (the admin and the server's loopback client), exactly as
// kube-apiserver's --authorization-mode=RBAC. Writes of roles and bindings
// are checked against escalation as kube-apiserver checks them: a user may
// grant only what it holds itself, unless it may "escalate" (roles) or
// "bind" (bindings).

// access is how the server decides: the authorizer its handler chain asks,
// and the rule resolver escalation checks and rules reviews use.
type access struct {
	authorizer authorizer.Authorizer
	rbac       *rbacauthorizer.RBACAuthorizer
	rules      rbacvalidation.AuthorizationRuleResolver
	// seen says whether the authorizer's informers hold the ClusterRole
	// (binding false) or ClusterRoleBinding of that name.
	seen func(name string, binding bool) bool
}

// nodes, if not nil, decides what node agents may beyond RBAC
// (nodeSecrets).
func newAccess(informers clientgoinformers.SharedInformerFactory, nodes authorizer.Authorizer) (*access, error) {
	rbac := informers.Rbac().V1()
	roles := &rbacauthorizer.RoleGetter{Lister: rbac.Roles().Lister()}
	bindings := &rbacauthorizer.RoleBindingLister{Lister: rbac.RoleBindings().Lister()}
	clusterRoles := &rbacauthorizer.ClusterRoleGetter{Lister: rbac.ClusterRoles().Lister()}
	clusterBindings := &rbacauthorizer.ClusterRoleBindingLister{Lister: rbac.ClusterRoleBindings().Lister()}
	a := rbacauthorizer.New(roles, bindings, clusterRoles, clusterBindings)
	named := []union.NamedAuthorizer{
		{AuthorizerName: "privileged", Authorizer: authorizerfactory.NewPrivilegedGroups(user.SystemPrivilegedGroup)},
		{AuthorizerName: "rbac", Authorizer: a}}
	if nodes != nil {
		named = append(named, union.NamedAuthorizer{AuthorizerName: "node-secrets", Authorizer: nodes})
	}
	chain, err := union.New(named...)
	if err != nil {
		return nil, err
	}
	return &access{
		authorizer: chain,
		rbac:       a,
		rules:      rbacvalidation.NewDefaultRuleResolver(roles, bindings, clusterRoles, clusterBindings),
		seen: func(name string, binding bool) bool {
			var err error
			if binding {
				_, err = rbac.ClusterRoleBindings().Lister().Get(name)
			} else {
				_, err = rbac.ClusterRoles().Lister().Get(name)
			}
			return err == nil
		},
	}, nil
}

// rbacGroup is the rbac.authorization.k8s.io API group.
func rbacGroup(getter generic.RESTOptionsGetter, acc *access) (*genericapiserver.APIGroupInfo, error) {
	cols := []extv1.CustomResourceColumnDefinition{col("Age", "date", ".metadata.creationTimestamp")}
	bindingCols := []extv1.CustomResourceColumnDefinition{col("Role", "string", ".roleRef.name"), col("Age", "date", ".metadata.creationTimestamp")}
	defs := []struct {
		name    string
		r       resource
		rules   func(ctx context.Context, obj runtime.Object) ([]rbacv1.PolicyRule, error)
		binding func(obj runtime.Object) rbacv1.RoleRef
	}{
		{"roles", resource{gr: rbacv1.Resource("roles"), singular: "role", namespaced: true,
			new: func() runtime.Object { return &rbacv1.Role{} }, newList: func() runtime.Object { return &rbacv1.RoleList{} },
			validateName: path.ValidatePathSegmentName, columns: cols,
			validate: func(obj runtime.Object) field.ErrorList { return validateRules(obj.(*rbacv1.Role).Rules, true) },
		}, func(_ context.Context, obj runtime.Object) ([]rbacv1.PolicyRule, error) {
			return obj.(*rbacv1.Role).Rules, nil
		}, nil},
		{"clusterroles", resource{gr: rbacv1.Resource("clusterroles"), singular: "clusterrole",
			new: func() runtime.Object { return &rbacv1.ClusterRole{} }, newList: func() runtime.Object { return &rbacv1.ClusterRoleList{} },
			validateName: path.ValidatePathSegmentName, columns: cols,
			validate: func(obj runtime.Object) field.ErrorList {
				cr := obj.(*rbacv1.ClusterRole)
				errs := validateRules(cr.Rules, false)
				if cr.AggregationRule != nil {
					// Nothing here aggregates: a rule that did nothing would mislead.
					errs = append(errs, field.Forbidden(field.NewPath("aggregationRule"), "hearth does not aggregate ClusterRoles; list the rules"))
				}
				return errs
			},
		}, func(_ context.Context, obj runtime.Object) ([]rbacv1.PolicyRule, error) {
			return obj.(*rbacv1.ClusterRole).Rules, nil
		}, nil},
		{"rolebindings", resource{gr: rbacv1.Resource("rolebindings"), singular: "rolebinding", namespaced: true,
			new: func() runtime.Object { return &rbacv1.RoleBinding{} }, newList: func() runtime.Object { return &rbacv1.RoleBindingList{} },
			validateName: path.ValidatePathSegmentName, columns: bindingCols,
			prepare: func(obj runtime.Object) {
				b := obj.(*rbacv1.RoleBinding)
				defaultBinding(&b.RoleRef, b.Subjects)
			},
			validate: func(obj runtime.Object) field.ErrorList {
				b := obj.(*rbacv1.RoleBinding)
				return validateBinding(b.RoleRef, b.Subjects, true)
			},
			validateUpdate: func(obj, old runtime.Object) field.ErrorList {
				return roleRefImmutable(obj.(*rbacv1.RoleBinding).RoleRef, old.(*rbacv1.RoleBinding).RoleRef)
			},
		}, nil, func(obj runtime.Object) rbacv1.RoleRef { return obj.(*rbacv1.RoleBinding).RoleRef }},
		{"clusterrolebindings", resource{gr: rbacv1.Resource("clusterrolebindings"), singular: "clusterrolebinding",
			new: func() runtime.Object { return &rbacv1.ClusterRoleBinding{} }, newList: func() runtime.Object { return &rbacv1.ClusterRoleBindingList{} },
			validateName: path.ValidatePathSegmentName, columns: bindingCols,
			prepare: func(obj runtime.Object) {
				b := obj.(*rbacv1.ClusterRoleBinding)
				defaultBinding(&b.RoleRef, b.Subjects)
			},
			validate: func(obj runtime.Object) field.ErrorList {
				b := obj.(*rbacv1.ClusterRoleBinding)
				return validateBinding(b.RoleRef, b.Subjects, false)
			},
			validateUpdate: func(obj, old runtime.Object) field.ErrorList {
				return roleRefImmutable(obj.(*rbacv1.ClusterRoleBinding).RoleRef, old.(*rbacv1.ClusterRoleBinding).RoleRef)
			},
		}, nil, func(obj runtime.Object) rbacv1.RoleRef { return obj.(*rbacv1.ClusterRoleBinding).RoleRef }},
	}
	g := genericapiserver.NewDefaultAPIGroupInfo(rbacv1.GroupName, coreScheme, metav1.ParameterCodec, coreCodecs)
	stores := map[string]rest.Storage{}
	for _, d := range defs {
		s, err := newStore(getter, d.r)
		if err != nil {
			return nil, err
		}
		rules := d.rules
		if d.binding != nil {
			rules = func(ctx context.Context, obj runtime.Object) ([]rbacv1.PolicyRule, error) {
				ns, _ := genericapirequest.NamespaceFrom(ctx)
				return acc.rules.GetRoleReferenceRules(ctx, d.binding(obj), ns)
			}
		}
		stores[d.name] = &escalationGuard{Store: s, acc: acc, rules: rules, binding: d.binding}
	}
	g.VersionedResourcesStorageMap["v1"] = stores
	return &g, nil
}

// escalationGuard refuses a role or binding that grants more than its
// writer holds, as kube-apiserver's policy-based RBAC storage does.
type escalationGuard struct {
	*genericregistry.Store
	acc *access
	// rules are what the object grants: a role's rules, or those of the
	// role a binding refers to.
	rules   func(ctx context.Context, obj runtime.Object) ([]rbacv1.PolicyRule, error)
	binding func(obj runtime.Object) rbacv1.RoleRef // nil for roles
}

func (g *escalationGuard) check(ctx context.Context, obj runtime.Object) error {
	if rbacregistry.EscalationAllowed(ctx) {
		return nil
	}
	ns, _ := genericapirequest.NamespaceFrom(ctx)
	if g.binding != nil {
		// As stored: the checks below take a defaulted roleRef.
		ref := g.binding(obj)
		if ref.APIGroup == "" {
			ref.APIGroup = rbacv1.GroupName
		}
		if rbacregistry.BindingAuthorized(ctx, rbacinternal.RoleRef{APIGroup: ref.APIGroup, Kind: ref.Kind, Name: ref.Name}, ns, g.acc.authorizer) {
			return nil
		}
	} else if rbacregistry.RoleEscalationAuthorized(ctx, g.acc.authorizer) {
		return nil
	}
	m, err := metaOf(obj)
	if err != nil {
		return err
	}
	rules, err := g.rules(ctx, obj)
	if err == nil {
		err = rbacvalidation.ConfirmNoEscalation(ctx, g.acc.rules, rules)
	}
	if err != nil {
		return apierrors.NewForbidden(g.DefaultQualifiedResource, m.GetName(), err)
	}
	return nil
}

func (g *escalationGuard) Create(ctx context.Context, obj runtime.Object, validate rest.ValidateObjectFunc, o *metav1.CreateOptions) (runtime.Object, error) {
	if err := g.check(ctx, obj); err != nil {
		return nil, err
	}
	return g.Store.Create(ctx, obj, validate, o)
}

func (g *escalationGuard) Update(ctx context.Context, name string, info rest.UpdatedObjectInfo, validateCreate rest.ValidateObjectFunc, validateUpdate rest.ValidateObjectUpdateFunc, force bool, o *metav1.UpdateOptions) (runtime.Object, bool, error) {
	checked := rest.WrapUpdatedObjectInfo(info, func(ctx context.Context, obj, _ runtime.Object) (runtime.Object, error) {
		return obj, g.check(ctx, obj)
	})
	return g.Store.Update(ctx, name, checked, validateCreate, validateUpdate, force, o)
}

func validateRules(rules []rbacv1.PolicyRule, namespaced bool) field.ErrorList {
	var errs field.ErrorList
	for i, r := range rules {
		p := field.NewPath("rules").Index(i)
		if len(r.Verbs) == 0 {
			errs = append(errs, field.Required(p.Child("verbs"), "verbs must contain at least one value"))
		}
		if len(r.NonResourceURLs) > 0 {
			if namespaced {
				errs = append(errs, field.Invalid(p.Child("nonResourceURLs"), r.NonResourceURLs, "namespaced rules cannot apply to non-resource URLs"))
			}
			if len(r.APIGroups) > 0 || len(r.Resources) > 0 || len(r.ResourceNames) > 0 {
				errs = append(errs, field.Invalid(p.Child("nonResourceURLs"), r.NonResourceURLs, "rules cannot apply to both regular resources and non-resource URLs"))
			}
			continue
		}
		if len(r.APIGroups) == 0 {
			errs = append(errs, field.Required(p.Child("apiGroups"), "resource rules must supply at least one api group"))
		}
		if len(r.Resources) == 0 {
			errs = append(errs, field.Required(p.Child("resources"), "resource rules must supply at least one resource"))
		}
	}
	return errs
}

func validateBinding(ref rbacv1.RoleRef, subjects []rbacv1.Subject, namespaced bool) field.ErrorList {
	var errs field.ErrorList
	p := field.NewPath("roleRef")
	if ref.APIGroup != rbacv1.GroupName {
		errs = append(errs, field.NotSupported(p.Child("apiGroup"), ref.APIGroup, []string{rbacv1.GroupName}))
	}
	kinds := []string{"ClusterRole"}
	if namespaced {
		kinds = append(kinds, "Role")
	}
	switch {
	case ref.Kind == "ClusterRole", namespaced && ref.Kind == "Role":
	default:
		errs = append(errs, field.NotSupported(p.Child("kind"), ref.Kind, kinds))
	}
	if ref.Name == "" {
		errs = append(errs, field.Required(p.Child("name"), ""))
	}
	for i, s := range subjects {
		sp := field.NewPath("subjects").Index(i)
		if s.Name == "" {
			errs = append(errs, field.Required(sp.Child("name"), ""))
		}
		switch s.Kind {
		case rbacv1.UserKind, rbacv1.GroupKind:
			if s.APIGroup != rbacv1.GroupName {
				errs = append(errs, field.NotSupported(sp.Child("apiGroup"), s.APIGroup, []string{rbacv1.GroupName}))
			}
		case rbacv1.ServiceAccountKind:
			if s.APIGroup != "" {
				errs = append(errs, field.NotSupported(sp.Child("apiGroup"), s.APIGroup, []string{""}))
			}
		default:
			errs = append(errs, field.NotSupported(sp.Child("kind"), s.Kind, []string{rbacv1.UserKind, rbacv1.GroupKind, rbacv1.ServiceAccountKind}))
		}
	}
	return errs
}

// defaultBinding sets the API groups that rbac/v1 defaults: the roleRef's,
// and users' and groups'.
func defaultBinding(ref *rbacv1.RoleRef, subjects []rbacv1.Subject) {
	if ref.APIGroup == "" {
		ref.APIGroup = rbacv1.GroupName
	}
	for i := range subjects {
		if k := subjects[i].Kind; (k == rbacv1.UserKind || k == rbacv1.GroupKind) && subjects[i].APIGroup == "" {
			subjects[i].APIGroup = rbacv1.GroupName
		}
	}
}

func roleRefImmutable(ref, old rbacv1.RoleRef) field.ErrorList {
	if ref != old {
		return field.ErrorList{field.Invalid(field.NewPath("roleRef"), ref, "cannot change roleRef")}
	}
	return nil
}
