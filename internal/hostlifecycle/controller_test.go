package hostlifecycle

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
)

func TestLostHost(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)

	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := t0
	renewed := metav1.NewMicroTime(t0)
	started := metav1.NewTime(t0)
	host := &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: "h1", CreationTimestamp: metav1.NewTime(t0)},
		Status: v1alpha1.HostStatus{Conditions: []metav1.Condition{{Type: v1alpha1.HostConditionReady, Status: metav1.ConditionTrue, Reason: "AgentReady"}}}}
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: v1alpha1.LeaseNamespace, Name: "h1"},
		Spec: coordinationv1.LeaseSpec{RenewTime: &renewed}}
	sb := func(name string, policy v1alpha1.RestartPolicy, phase v1alpha1.Phase, start *metav1.Time) *v1alpha1.Sandbox {
		return &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Finalizers: []string{v1alpha1.Finalizer}},
			Spec:   v1alpha1.SandboxSpec{Image: "img", RestartPolicy: policy},
			Status: v1alpha1.SandboxStatus{HostName: "h1", Phase: phase, StartedAt: start}}
	}
	deleting := sb("deleting", v1alpha1.RestartAlways, v1alpha1.PhaseRunning, &started)
	deleting.DeletionTimestamp = &started
	c := fake.NewClientBuilder().WithScheme(scheme).
		WithStatusSubresource(&v1alpha1.Host{}, &v1alpha1.Sandbox{}).
		WithIndex(&v1alpha1.Sandbox{}, HostNameField, func(o client.Object) []string { return []string{o.(*v1alpha1.Sandbox).Status.HostName} }).
		WithObjects(host, lease,
			sb("always", v1alpha1.RestartAlways, v1alpha1.PhaseRunning, &started),
			sb("never-started", v1alpha1.RestartNever, v1alpha1.PhaseRunning, &started),
			sb("never-booting", v1alpha1.RestartNever, v1alpha1.PhaseBooting, nil),
			sb("done", v1alpha1.RestartNever, v1alpha1.PhaseSucceeded, &started),
			deleting).
		Build()
	ctrl := &Controller{Client: c, Recorder: record.NewFakeRecorder(100), Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Timeout: 40 * time.Second, LostAfter: time.Minute, Now: func() time.Time { return now }}
	req := reconcile.Request{NamespacedName: client.ObjectKey{Name: "h1"}}
	step := func(at time.Duration) {
		t.Helper()
		now = t0.Add(at)
		if _, err := ctrl.Reconcile(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	ready := func() *metav1.Condition {
		var h v1alpha1.Host
		if err := c.Get(ctx, req.NamespacedName, &h); err != nil {
			t.Fatal(err)
		}
		return meta.FindStatusCondition(h.Status.Conditions, v1alpha1.HostConditionReady)
	}
	get := func(name string) *v1alpha1.Sandbox {
		var s v1alpha1.Sandbox
		if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: name}, &s); err != nil {
			t.Fatalf("get %s: %v", name, err)
		}
		return &s
	}

	step(10 * time.Second)
	if r := ready(); r.Status != metav1.ConditionTrue {
		t.Fatalf("ready after 10 s of silence: %+v", r)
	}
	step(45 * time.Second)
	if r := ready(); r.Status != metav1.ConditionFalse || r.Reason != ReasonLapsed {
		t.Fatalf("not NotReady after 45 s of silence: %+v", r)
	}
	step(90 * time.Second) // NotReady for 45 s < LostAfter
	if s := get("always"); s.Status.HostName != "h1" {
		t.Fatalf("moved before LostAfter: %+v", s.Status)
	}
	step(110 * time.Second)
	if s := get("always"); s.Status.HostName != "" || s.Status.Phase != v1alpha1.PhasePending || s.Status.Reason != "HostLost" || s.Status.RestartCount != 1 {
		t.Errorf("restartPolicy Always: %+v, want unbound, Pending, HostLost", s.Status)
	}
	if s := get("never-started"); s.Status.HostName != "h1" || s.Status.Phase != v1alpha1.PhaseFailed || s.Status.Reason != "HostLost" {
		t.Errorf("restartPolicy Never, started: %+v, want Failed, HostLost", s.Status)
	}
	if s := get("never-booting"); s.Status.HostName != "" || s.Status.Phase != v1alpha1.PhasePending {
		t.Errorf("restartPolicy Never, never started: %+v, want placed again", s.Status)
	}
	if s := get("done"); s.Status.Phase != v1alpha1.PhaseSucceeded || s.Status.HostName != "h1" {
		t.Errorf("ended sandbox changed: %+v", s.Status)
	}
	var gone v1alpha1.Sandbox
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "deleting"}, &gone); err == nil {
		t.Errorf("a sandbox being deleted on a lost host kept its finalizer: %v", gone.Finalizers)
	}

	// The agent comes back: Ready again.
	renewed = metav1.NewMicroTime(t0.Add(119 * time.Second))
	lease.Spec.RenewTime = &renewed
	var l coordinationv1.Lease
	_ = c.Get(ctx, client.ObjectKeyFromObject(lease), &l)
	l.Spec.RenewTime = &renewed
	if err := c.Update(ctx, &l); err != nil {
		t.Fatal(err)
	}
	step(120 * time.Second)
	if r := ready(); r.Status != metav1.ConditionTrue || r.Reason != ReasonResumed {
		t.Errorf("not Ready after the heartbeat resumed: %+v", r)
	}
}
