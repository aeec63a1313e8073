package scheduler

import (
	"context"
	"io"
	"log/slog"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"hearth.dev/hearth/api/v1alpha1"
)

// A pass that starts before the cache shows the last pass's Unschedulable
// report does not write it again (that write could only conflict); once
// the cache has caught up, nothing is written either.
func TestUnschedulableNotRewrittenFromStaleCache(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	sb := &v1alpha1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "default", UID: types.UID("uid-a")},
		Spec:       v1alpha1.SandboxSpec{Image: "img", HostSelector: map[string]string{"no": "such-host"}},
	}
	var writes int
	var stale *v1alpha1.SandboxList // when set, what the "cache" lists
	c := fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.Sandbox{}).WithObjects(sb).
		WithInterceptorFuncs(interceptor.Funcs{
			List: func(ctx context.Context, c client.WithWatch, list client.ObjectList, opts ...client.ListOption) error {
				if l, ok := list.(*v1alpha1.SandboxList); ok && stale != nil {
					stale.DeepCopyInto(l)
					return nil
				}
				return c.List(ctx, list, opts...)
			},
			SubResourceUpdate: func(ctx context.Context, c client.Client, sub string, obj client.Object, opts ...client.SubResourceUpdateOption) error {
				writes++
				return c.SubResource(sub).Update(ctx, obj, opts...)
			},
		}).Build()
	ctrl := &Controller{Client: c, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		assumed: map[types.UID]assumption{}, reported: map[types.UID]string{}}

	var before v1alpha1.SandboxList
	if err := c.List(ctx, &before); err != nil {
		t.Fatal(err)
	}
	pass := func(want int, what string) {
		t.Helper()
		writes = 0
		if _, err := ctrl.Reconcile(ctx, passKey); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if writes != want {
			t.Fatalf("%s: %d status writes, want %d", what, writes, want)
		}
	}
	pass(1, "first pass")
	stale = &before
	pass(0, "pass on a cache without the report")
	pass(0, "another such pass")
	stale = nil
	pass(0, "pass on a cache with the report")
	if len(ctrl.reported) != 0 {
		t.Errorf("reports still remembered once seen: %v", ctrl.reported)
	}
	var got v1alpha1.Sandbox
	if err := c.Get(ctx, client.ObjectKeyFromObject(sb), &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1alpha1.PhasePending || got.Status.Reason != "Unschedulable" {
		t.Errorf("status %s/%s, want Pending/Unschedulable", got.Status.Phase, got.Status.Reason)
	}
}

// TestEquivalence: sandboxes that could fit different hosts never share
// a key, so that one's failure does not stand for the other's.
func TestEquivalence(t *testing.T) {
	base := sandbox("a", "1")
	if equivalence(base) != equivalence(sandbox("b", "1")) {
		t.Error("two alike sandboxes have different keys")
	}
	for name, m := range map[string]mod{
		"isolation": func(sb *v1alpha1.Sandbox) { sb.Spec.Isolation = v1alpha1.IsolationHardware },
		"snapshot":  func(sb *v1alpha1.Sandbox) { sb.Spec.Source = &v1alpha1.SandboxSource{Snapshot: "s"} },
		"selector":  func(sb *v1alpha1.Sandbox) { sb.Spec.HostSelector = map[string]string{"k": "v"} },
		"placement": func(sb *v1alpha1.Sandbox) { sb.Spec.Placement = v1alpha1.PlacementBinpack },
	} {
		if equivalence(with(sandbox("b", "1"), m)) == equivalence(base) {
			t.Errorf("a sandbox differing in %s shares the key", name)
		}
	}
}
