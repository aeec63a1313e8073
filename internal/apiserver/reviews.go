package apiserver

import (
	"context"
	"fmt"

	authorizationv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
)

// The authorization.k8s.io reviews a user asks about itself: what
// `kubectl auth can-i` sends. SelfSubjectAccessReview asks the server's
// authorizer, exactly as a request would be asked; SelfSubjectRulesReview
// lists the RBAC rules that apply in a namespace (`can-i --list`).

func authorizationGroup(acc *access) *genericapiserver.APIGroupInfo {
	g := genericapiserver.NewDefaultAPIGroupInfo(authorizationv1.GroupName, coreScheme, metav1.ParameterCodec, coreCodecs)
	g.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{
		"selfsubjectaccessreviews": &accessReview{acc: acc},
		"selfsubjectrulesreviews":  &rulesReview{acc: acc},
	}
	return &g
}

type accessReview struct{ acc *access }

var (
	_ rest.Creater              = &accessReview{}
	_ rest.SingularNameProvider = &accessReview{}
)

func (*accessReview) New() runtime.Object     { return &authorizationv1.SelfSubjectAccessReview{} }
func (*accessReview) Destroy()                {}
func (*accessReview) NamespaceScoped() bool   { return false }
func (*accessReview) GetSingularName() string { return "selfsubjectaccessreview" }
func (r *accessReview) Create(ctx context.Context, obj runtime.Object, validate rest.ValidateObjectFunc, _ *metav1.CreateOptions) (runtime.Object, error) {
	review, ok := obj.(*authorizationv1.SelfSubjectAccessReview)
	if !ok {
		return nil, apierrors.NewBadRequest(fmt.Sprintf("not a SelfSubjectAccessReview: %T", obj))
	}
	u, ok := genericapirequest.UserFrom(ctx)
	if !ok {
		return nil, apierrors.NewBadRequest("no user in the request")
	}
	if validate != nil {
		if err := validate(ctx, obj); err != nil {
			return nil, err
		}
	}
	attrs := authorizer.AttributesRecord{User: u}
	switch s := review.Spec; {
	case s.ResourceAttributes != nil && s.NonResourceAttributes == nil:
		ra := s.ResourceAttributes
		attrs.ResourceRequest = true
		attrs.Verb, attrs.Namespace, attrs.APIGroup, attrs.APIVersion = ra.Verb, ra.Namespace, ra.Group, ra.Version
		attrs.Resource, attrs.Subresource, attrs.Name = ra.Resource, ra.Subresource, ra.Name
	case s.NonResourceAttributes != nil && s.ResourceAttributes == nil:
		attrs.Verb, attrs.Path = s.NonResourceAttributes.Verb, s.NonResourceAttributes.Path
	default:
		return nil, apierrors.NewBadRequest("spec: exactly one of resourceAttributes and nonResourceAttributes is required")
	}
	decision, reason, err := r.acc.authorizer.Authorize(ctx, attrs)
	review.Status = authorizationv1.SubjectAccessReviewStatus{
		Allowed: decision == authorizer.DecisionAllow, Denied: decision == authorizer.DecisionDeny, Reason: reason}
	if err != nil {
		review.Status.EvaluationError = err.Error()
	}
	return review, nil
}

type rulesReview struct{ acc *access }

var (
	_ rest.Creater              = &rulesReview{}
	_ rest.SingularNameProvider = &rulesReview{}
)

func (*rulesReview) New() runtime.Object     { return &authorizationv1.SelfSubjectRulesReview{} }
func (*rulesReview) Destroy()                {}
func (*rulesReview) NamespaceScoped() bool   { return false }
func (*rulesReview) GetSingularName() string { return "selfsubjectrulesreview" }
func (r *rulesReview) Create(ctx context.Context, obj runtime.Object, _ rest.ValidateObjectFunc, _ *metav1.CreateOptions) (runtime.Object, error) {
	review, ok := obj.(*authorizationv1.SelfSubjectRulesReview)
	if !ok {
		return nil, apierrors.NewBadRequest(fmt.Sprintf("not a SelfSubjectRulesReview: %T", obj))
	}
	u, ok := genericapirequest.UserFrom(ctx)
	if !ok {
		return nil, apierrors.NewBadRequest("no user in the request")
	}
	if review.Spec.Namespace == "" {
		return nil, apierrors.NewBadRequest("spec.namespace is required")
	}
	resources, nonResources, incomplete, err := r.acc.rbac.RulesFor(ctx, u, review.Spec.Namespace)
	st := authorizationv1.SubjectRulesReviewStatus{Incomplete: incomplete}
	for _, ri := range resources {
		st.ResourceRules = append(st.ResourceRules, authorizationv1.ResourceRule{
			Verbs: ri.GetVerbs(), APIGroups: ri.GetAPIGroups(), Resources: ri.GetResources(), ResourceNames: ri.GetResourceNames()})
	}
	for _, ri := range nonResources {
		st.NonResourceRules = append(st.NonResourceRules, authorizationv1.NonResourceRule{Verbs: ri.GetVerbs(), NonResourceURLs: ri.GetNonResourceURLs()})
	}
	if err != nil {
		st.EvaluationError = err.Error()
	}
	review.Status = st
	return review, nil
}
