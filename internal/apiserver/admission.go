package apiserver

import (
	"context"
	"fmt"
	"slices"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/user"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/image"
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

// localImageAdmission refuses, to everyone but the admin (system:masters),
// sandboxes and templates whose image names files on the node (oci:DIR,
// docker-archive:FILE): the node opens them as root, so a tenant could
// boot whatever layout lies on the host, or probe any path through the
// error it gets back. Tenants give registry references.
type localImageAdmission struct{}

var _ admission.ValidationInterface = localImageAdmission{}

func (localImageAdmission) Handles(op admission.Operation) bool {
	return op == admission.Create || op == admission.Update
}

func (localImageAdmission) Validate(_ context.Context, a admission.Attributes, _ admission.ObjectInterfaces) error {
	gr := a.GetResource().GroupResource()
	if gr.Group != v1alpha1.GroupVersion.Group || (gr.Resource != "sandboxes" && gr.Resource != "sandboxtemplates") || a.GetSubresource() != "" {
		return nil
	}
	if u := a.GetUserInfo(); u != nil && slices.Contains(u.GetGroups(), user.SystemPrivilegedGroup) {
		return nil
	}
	u, ok := a.GetObject().(*unstructured.Unstructured)
	if !ok {
		return admission.NewForbidden(a, fmt.Errorf("cannot read the image of a %T", a.GetObject()))
	}
	ref, _, _ := unstructured.NestedString(u.Object, "spec", "image")
	if old, ok := a.GetOldObject().(*unstructured.Unstructured); ok && a.GetOperation() == admission.Update {
		// Others may write an object the admin made (a node its
		// finalizers): what is refused is a new local image.
		if was, _, _ := unstructured.NestedString(old.Object, "spec", "image"); was == ref {
			return nil
		}
	}
	if image.IsLocal(ref) {
		return admission.NewForbidden(a, fmt.Errorf("spec.image %q: images from files on the host (oci:, docker-archive:) are for the admin and `hearth run --local`; give a registry reference", ref))
	}
	return nil
}
