package apiserver

import (
	"context"
	"fmt"

	authorizationv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/registry/customresource/tableconvertor"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/names"
)

// The core API: what kubectl and controller-runtime expect of any cluster
// besides hearth's own resources. Namespaces, Events and Secrets (core/v1;
// the ingress's certificates and access tokens) and
// Leases (coordination.k8s.io/v1) are served by k8s.io/apiserver's generic
// registry over the same etcd, with the k8s.io/api types.
//
// A generic registry converts between the wire version and an internal
// "hub" version. These resources have one version, so each k8s.io/api type
// is registered as its own internal type as well: the scheme then converts
// by copying and setting the kind (runtime.Scheme.convertToVersion), and no
// conversion functions are needed.

var (
	coreScheme = runtime.NewScheme()
	coreCodecs = serializer.NewCodecFactory(coreScheme)
)

// coreKinds are the served types, by group version.
var coreKinds = map[schema.GroupVersion][]runtime.Object{
	corev1.SchemeGroupVersion: {
		&corev1.Namespace{}, &corev1.NamespaceList{}, &corev1.Event{}, &corev1.EventList{},
		&corev1.Secret{}, &corev1.SecretList{}, &corev1.ResourceQuota{}, &corev1.ResourceQuotaList{},
		&corev1.LimitRange{}, &corev1.LimitRangeList{},
	},
	coordinationv1.SchemeGroupVersion: {&coordinationv1.Lease{}, &coordinationv1.LeaseList{}},
	rbacv1.SchemeGroupVersion: {
		&rbacv1.Role{}, &rbacv1.RoleList{}, &rbacv1.ClusterRole{}, &rbacv1.ClusterRoleList{},
		&rbacv1.RoleBinding{}, &rbacv1.RoleBindingList{}, &rbacv1.ClusterRoleBinding{}, &rbacv1.ClusterRoleBindingList{},
	},
	authorizationv1.SchemeGroupVersion: {&authorizationv1.SelfSubjectAccessReview{}, &authorizationv1.SelfSubjectRulesReview{}},
}

func init() {
	for gv, objs := range coreKinds {
		coreScheme.AddKnownTypes(gv, objs...)
		coreScheme.AddKnownTypes(schema.GroupVersion{Group: gv.Group, Version: runtime.APIVersionInternal}, objs...)
		metav1.AddToGroupVersion(coreScheme, gv)
	}
	unversioned := schema.GroupVersion{Group: "", Version: "v1"}
	coreScheme.AddUnversionedTypes(unversioned, &metav1.Status{}, &metav1.APIVersions{},
		&metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
	// The field selectors kubectl describe and controllers use on events.
	must(coreScheme.AddFieldLabelConversionFunc(corev1.SchemeGroupVersion.WithKind("Event"),
		func(label, value string) (string, string, error) {
			if _, ok := eventFields(&corev1.Event{})[label]; !ok {
				return "", "", fmt.Errorf("field label %q not supported for events", label)
			}
			return label, value, nil
		}))
	must(coreScheme.AddFieldLabelConversionFunc(corev1.SchemeGroupVersion.WithKind("Namespace"),
		func(label, value string) (string, string, error) {
			switch label {
			case "metadata.name", "status.phase":
				return label, value, nil
			}
			return "", "", fmt.Errorf("field label %q not supported for namespaces", label)
		}))
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func eventFields(e *corev1.Event) fields.Set {
	return fields.Set{
		"metadata.name":                  e.Name,
		"metadata.namespace":             e.Namespace,
		"involvedObject.kind":            e.InvolvedObject.Kind,
		"involvedObject.namespace":       e.InvolvedObject.Namespace,
		"involvedObject.name":            e.InvolvedObject.Name,
		"involvedObject.uid":             string(e.InvolvedObject.UID),
		"involvedObject.apiVersion":      e.InvolvedObject.APIVersion,
		"involvedObject.resourceVersion": e.InvolvedObject.ResourceVersion,
		"involvedObject.fieldPath":       e.InvolvedObject.FieldPath,
		"reason":                         e.Reason,
		"reportingComponent":             e.ReportingController,
		"source":                         e.Source.Component,
		"type":                           e.Type,
	}
}

// coreAPIGroups are the API groups of the core API, backed by getter.
// quotas is the ResourceQuota storage, which quota admission writes to.
func coreAPIGroups(getter generic.RESTOptionsGetter, acc *access) (legacy *genericapiserver.APIGroupInfo, groups []*genericapiserver.APIGroupInfo, quotas *genericregistry.Store, err error) {
	ns, err := newStore(getter, resource{
		gr: corev1.Resource("namespaces"), singular: "namespace",
		new: func() runtime.Object { return &corev1.Namespace{} }, newList: func() runtime.Object { return &corev1.NamespaceList{} },
		prepare: func(obj runtime.Object) {
			ns := obj.(*corev1.Namespace)
			ns.Status.Phase = corev1.NamespaceActive
		},
		validateName: apivalidation.NameIsDNSLabel,
		columns:      []extv1.CustomResourceColumnDefinition{col("Status", "string", ".status.phase"), col("Age", "date", ".metadata.creationTimestamp")},
		fields: func(obj runtime.Object) fields.Set {
			ns := obj.(*corev1.Namespace)
			return fields.Set{"metadata.name": ns.Name, "status.phase": string(ns.Status.Phase)}
		},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	ev, err := newStore(getter, resource{
		gr: corev1.Resource("events"), singular: "event", namespaced: true,
		new: func() runtime.Object { return &corev1.Event{} }, newList: func() runtime.Object { return &corev1.EventList{} },
		validateName: apivalidation.NameIsDNSSubdomain,
		fields:       func(obj runtime.Object) fields.Set { return eventFields(obj.(*corev1.Event)) },
		columns: []extv1.CustomResourceColumnDefinition{col("Last Seen", "date", ".lastTimestamp"), col("Type", "string", ".type"),
			col("Reason", "string", ".reason"), col("Object", "string", ".involvedObject.name"), col("Message", "string", ".message")},
		// Events expire, as kube-apiserver's --event-ttl.
		ttl: 3600,
	})
	if err != nil {
		return nil, nil, nil, err
	}
	secrets, err := newStore(getter, resource{
		gr: corev1.Resource("secrets"), singular: "secret", namespaced: true,
		new: func() runtime.Object { return &corev1.Secret{} }, newList: func() runtime.Object { return &corev1.SecretList{} },
		prepare: func(obj runtime.Object) {
			// As kube-apiserver: stringData is write-only, merged into data.
			sec := obj.(*corev1.Secret)
			for k, v := range sec.StringData {
				if sec.Data == nil {
					sec.Data = map[string][]byte{}
				}
				sec.Data[k] = []byte(v)
			}
			sec.StringData = nil
			if sec.Type == "" {
				sec.Type = corev1.SecretTypeOpaque
			}
		},
		validateName: apivalidation.NameIsDNSSubdomain,
		columns:      []extv1.CustomResourceColumnDefinition{col("Type", "string", ".type"), col("Age", "date", ".metadata.creationTimestamp")},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	quotas, err = newStore(getter, resource{
		gr: corev1.Resource("resourcequotas"), singular: "resourcequota", namespaced: true,
		new: func() runtime.Object { return &corev1.ResourceQuota{} }, newList: func() runtime.Object { return &corev1.ResourceQuotaList{} },
		validateName: apivalidation.NameIsDNSSubdomain, validate: validateQuota,
		columns: []extv1.CustomResourceColumnDefinition{col("Age", "date", ".metadata.creationTimestamp")},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	limits, err := newStore(getter, resource{
		gr: corev1.Resource("limitranges"), singular: "limitrange", namespaced: true,
		new: func() runtime.Object { return &corev1.LimitRange{} }, newList: func() runtime.Object { return &corev1.LimitRangeList{} },
		validateName: apivalidation.NameIsDNSSubdomain, validate: validateLimitRange,
		columns: []extv1.CustomResourceColumnDefinition{col("Age", "date", ".metadata.creationTimestamp")},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	leases, err := newStore(getter, resource{
		gr: coordinationv1.Resource("leases"), singular: "lease", namespaced: true,
		new: func() runtime.Object { return &coordinationv1.Lease{} }, newList: func() runtime.Object { return &coordinationv1.LeaseList{} },
		validateName: apivalidation.NameIsDNSSubdomain,
		columns:      []extv1.CustomResourceColumnDefinition{col("Holder", "string", ".spec.holderIdentity"), col("Age", "date", ".metadata.creationTimestamp")},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	core := genericapiserver.NewDefaultAPIGroupInfo(corev1.GroupName, coreScheme, metav1.ParameterCodec, coreCodecs)
	core.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{
		"namespaces": shortNames{ns, []string{"ns"}}, "events": shortNames{ev, []string{"ev"}},
		"secrets": secrets, "resourcequotas": shortNames{quotas, []string{"quota"}},
		"limitranges": shortNames{limits, []string{"limits"}}}
	coord := genericapiserver.NewDefaultAPIGroupInfo(coordinationv1.GroupName, coreScheme, metav1.ParameterCodec, coreCodecs)
	coord.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{"leases": leases}
	rbac, err := rbacGroup(getter, acc)
	if err != nil {
		return nil, nil, nil, err
	}
	return &core, []*genericapiserver.APIGroupInfo{&coord, rbac, authorizationGroup(acc)}, quotas, nil
}

// resource describes one served resource of the core API.
type resource struct {
	gr           schema.GroupResource
	singular     string
	namespaced   bool
	new, newList func() runtime.Object
	prepare      func(runtime.Object)
	validateName apivalidation.ValidateNameFunc
	// validate checks the object beyond its metadata; validateUpdate,
	// what may not change.
	validate       func(obj runtime.Object) field.ErrorList
	validateUpdate func(obj, old runtime.Object) field.ErrorList
	fields         func(runtime.Object) fields.Set // beyond metadata.name/namespace
	ttl            uint64                          // seconds; 0 keeps objects
	// columns are kubectl get's, beyond the name (kube-apiserver's own).
	columns []extv1.CustomResourceColumnDefinition
}

func col(name, typ, path string) extv1.CustomResourceColumnDefinition {
	return extv1.CustomResourceColumnDefinition{Name: name, Type: typ, JSONPath: path}
}

func newStore(getter generic.RESTOptionsGetter, r resource) (*genericregistry.Store, error) {
	s := strategy{ObjectTyper: coreScheme, NameGenerator: names.SimpleNameGenerator, r: r}
	table, err := tableconvertor.New(r.columns)
	if err != nil {
		return nil, err
	}
	store := &genericregistry.Store{
		NewFunc:                   r.new,
		NewListFunc:               r.newList,
		DefaultQualifiedResource:  r.gr,
		SingularQualifiedResource: schema.GroupResource{Group: r.gr.Group, Resource: r.singular},
		CreateStrategy:            s,
		UpdateStrategy:            s,
		DeleteStrategy:            s,
		TableConvertor:            table,
	}
	if r.ttl > 0 {
		store.TTLFunc = func(runtime.Object, uint64, bool) (uint64, error) { return r.ttl, nil }
	}
	attrs := func(obj runtime.Object) (labels.Set, fields.Set, error) {
		m, err := metaOf(obj)
		if err != nil {
			return nil, nil, err
		}
		fs := fields.Set{"metadata.name": m.GetName()}
		if r.namespaced {
			fs["metadata.namespace"] = m.GetNamespace()
		}
		if r.fields != nil {
			for k, v := range r.fields(obj) {
				fs[k] = v
			}
		}
		return labels.Set(m.GetLabels()), fs, nil
	}
	store.PredicateFunc = func(l labels.Selector, f fields.Selector) storage.SelectionPredicate {
		return storage.SelectionPredicate{Label: l, Field: f, GetAttrs: attrs}
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: getter, AttrFunc: attrs}); err != nil {
		return nil, fmt.Errorf("%s storage: %w", r.gr, err)
	}
	return store, nil
}

func metaOf(obj runtime.Object) (metav1.Object, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return nil, fmt.Errorf("%T has no object metadata", obj)
	}
	return m, nil
}

// strategy is the create, update and delete behaviour of a core resource:
// metadata validation, and nothing the clients set is rewritten.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	r resource
}

func (s strategy) NamespaceScoped() bool { return s.r.namespaced }

func (s strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if s.r.prepare != nil {
		s.r.prepare(obj)
	}
}

func (s strategy) PrepareForUpdate(_ context.Context, obj, _ runtime.Object) {
	if s.r.prepare != nil {
		s.r.prepare(obj)
	}
}

func (s strategy) Validate(_ context.Context, obj runtime.Object) field.ErrorList {
	m, err := metaOf(obj)
	if err != nil {
		return field.ErrorList{field.InternalError(field.NewPath("metadata"), err)}
	}
	errs := apivalidation.ValidateObjectMetaAccessor(m, s.r.namespaced, s.r.validateName, field.NewPath("metadata"))
	if s.r.validate != nil {
		errs = append(errs, s.r.validate(obj)...)
	}
	return errs
}

func (s strategy) ValidateUpdate(_ context.Context, obj, old runtime.Object) field.ErrorList {
	m, err := metaOf(obj)
	if err != nil {
		return field.ErrorList{field.InternalError(field.NewPath("metadata"), err)}
	}
	o, err := metaOf(old)
	if err != nil {
		return field.ErrorList{field.InternalError(field.NewPath("metadata"), err)}
	}
	errs := apivalidation.ValidateObjectMetaAccessorUpdate(m, o, field.NewPath("metadata"))
	if s.r.validate != nil {
		errs = append(errs, s.r.validate(obj)...)
	}
	if s.r.validateUpdate != nil {
		errs = append(errs, s.r.validateUpdate(obj, old)...)
	}
	return errs
}

func (strategy) WarningsOnCreate(context.Context, runtime.Object) []string { return nil }

func (strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func (strategy) Canonicalize(runtime.Object)                   {}
func (strategy) AllowCreateOnUpdate(context.Context) bool      { return false }
func (strategy) AllowUnconditionalUpdate(context.Context) bool { return true }

// shortNames gives a store the short names kubectl knows it by.
type shortNames struct {
	*genericregistry.Store
	names []string
}

func (s shortNames) ShortNames() []string { return s.names }

var _ rest.ShortNamesProvider = shortNames{}
