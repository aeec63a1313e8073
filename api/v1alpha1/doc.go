// Package v1alpha1 is hearth's API, group hearth.dev, version v1alpha1:
// Sandbox (one workload in one micro-VM) and Host (a node agent's machine).
// The types carry kubebuilder markers; `make generate` turns them into the
// CustomResourceDefinitions under crds/ (served by hearthd's embedded
// apiextensions-apiserver, installable into any Kubernetes cluster) and the
// deep-copy functions.
//
// +kubebuilder:object:generate=true
// +groupName=hearth.dev
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

// GroupVersion is the API's group and version.
var GroupVersion = schema.GroupVersion{Group: "hearth.dev", Version: "v1alpha1"}

var (
	// SchemeBuilder registers the types with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}
	// AddToScheme adds the types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
