package apiserver

import (
	"context"
	"slices"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apiserver/pkg/admission"

	"hearth.dev/hearth/api/v1alpha1"
)

// finalizerAdmission is a built-in mutating admission plugin: every Sandbox
// is created with hearth's finalizer, so that deleting it waits for its host
// to stop its VM, without a second write by a controller to add it.
type finalizerAdmission struct{}

var _ admission.MutationInterface = finalizerAdmission{}

func (finalizerAdmission) Handles(op admission.Operation) bool { return op == admission.Create }

func (finalizerAdmission) Admit(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	gr := a.GetResource().GroupResource()
	if gr.Group != v1alpha1.GroupVersion.Group || gr.Resource != "sandboxes" || a.GetSubresource() != "" {
		return nil
	}
	u, ok := a.GetObject().(*unstructured.Unstructured)
	if !ok {
		return nil
	}
	if f := u.GetFinalizers(); !slices.Contains(f, v1alpha1.Finalizer) {
		u.SetFinalizers(append(f, v1alpha1.Finalizer))
	}
	return nil
}
