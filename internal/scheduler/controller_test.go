package scheduler

import (
	"context"
	"io"
	"log/slog"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"k8s.io/utils/ptr"

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

// A sandbox migrating in takes room on its target before it is bound
// there: a sandbox placed meanwhile does not get that room too.
func TestMigrationTakesRoomOnItsTarget(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	host := func(name string) *v1alpha1.Host {
		h := &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"hearth.dev/hostname": name}}}
		h.Status.Allocatable = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("8Gi"),
			corev1.ResourceStorage: resource.MustParse("100Gi"), v1alpha1.ResourceSandboxes: resource.MustParse("10")}
		h.Status.Conditions = []metav1.Condition{{Type: v1alpha1.HostConditionReady, Status: metav1.ConditionTrue, Reason: "Ready", LastTransitionTime: metav1.Now()}}
		return h
	}
	sandbox := func(name, on string) *v1alpha1.Sandbox {
		sb := &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
			Spec: v1alpha1.SandboxSpec{Image: "img", Resources: v1alpha1.Resources{CPU: ptr.To(resource.MustParse("2"))}}}
		if on != "" {
			sb.Status.HostName, sb.Status.Phase = on, v1alpha1.PhaseRunning
		}
		return sb
	}
	moving := &v1alpha1.Migration{ObjectMeta: metav1.ObjectMeta{Name: "m", Namespace: "default"}, Spec: v1alpha1.MigrationSpec{Sandbox: "moving"}}
	moving.Status = v1alpha1.MigrationStatus{Phase: v1alpha1.MigrationCopying, SourceHost: "h1", TargetHost: "h2", SandboxUID: "uid-moving"}
	for _, tc := range []struct {
		phase v1alpha1.MigrationPhase
		fits  bool
	}{{v1alpha1.MigrationCopying, false}, {v1alpha1.MigrationFailed, true}} {
		moving.Status.Phase = tc.phase
		c := fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.Sandbox{}).
			WithObjects(host("h1"), host("h2"), sandbox("moving", "h1"), sandbox("new", ""), moving.DeepCopy()).Build()
		ctrl := &Controller{Client: c, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
			assumed: map[types.UID]assumption{}, reported: map[types.UID]string{}}
		if _, err := ctrl.Reconcile(ctx, passKey); err != nil {
			t.Fatal(err)
		}
		var got v1alpha1.Sandbox
		if err := c.Get(ctx, types.NamespacedName{Namespace: "default", Name: "new"}, &got); err != nil {
			t.Fatal(err)
		}
		if fits := got.Status.HostName == "h2"; fits != tc.fits {
			t.Errorf("with a migration to h2 %s: the new sandbox is on %q (%s)", tc.phase, got.Status.HostName, got.Status.Message)
		}
	}
}
