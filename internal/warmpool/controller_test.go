package warmpool

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func at(s int) metav1.Time { return metav1.NewTime(t0.Add(time.Duration(s) * time.Second)) }

// member is a sandbox of pool p on host h-NAME, created at second created.
func member(name string, created int, running bool, claimedBy string) *v1alpha1.Sandbox {
	sb := &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: types.UID(name + "-uid"),
		CreationTimestamp: at(created), Labels: map[string]string{v1alpha1.LabelWarmPool: "p"}},
		Spec:   v1alpha1.SandboxSpec{Source: &v1alpha1.SandboxSource{Template: "t"}},
		Status: v1alpha1.SandboxStatus{HostName: "h-" + name, Phase: v1alpha1.PhaseBooting}}
	if running {
		sb.Status.Phase = v1alpha1.PhaseRunning
		meta.SetStatusCondition(&sb.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Running"})
	}
	if claimedBy != "" {
		sb.Annotations = map[string]string{v1alpha1.AnnotationClaimedBy: claimedBy}
	}
	return sb
}

// claim is a sandbox that claims pool p.
func claim(name string, created int) *v1alpha1.Sandbox {
	return &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: types.UID(name + "-uid"),
		CreationTimestamp: at(created)},
		Spec: v1alpha1.SandboxSpec{Source: &v1alpha1.SandboxSource{WarmPool: "p"}}}
}

// reconciled is a fake API holding pool p of 2 (template t) and objs,
// after one pass of the controller; get reads a sandbox back.
func reconciled(t *testing.T, objs ...client.Object) (c client.Client, pool *v1alpha1.WarmPool, get func(string) *v1alpha1.Sandbox) {
	t.Helper()
	ctx := context.Background()
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	pool = &v1alpha1.WarmPool{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "p", UID: "pool-uid"},
		Spec: v1alpha1.WarmPoolSpec{Template: "t", Replicas: 2}}
	tpl := &v1alpha1.SandboxTemplate{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "t"},
		Spec: v1alpha1.SandboxTemplateSpec{Image: "img"}}
	c = fake.NewClientBuilder().WithScheme(scheme).
		WithStatusSubresource(&v1alpha1.Sandbox{}, &v1alpha1.WarmPool{}).
		WithIndex(&v1alpha1.Sandbox{}, poolIndex, func(o client.Object) []string {
			if p := poolOf(o.(*v1alpha1.Sandbox)); p != "" {
				return []string{p}
			}
			return nil
		}).
		WithObjects(append([]client.Object{pool, tpl}, objs...)...).
		Build()
	ctrl := &Controller{Client: c, Recorder: record.NewFakeRecorder(100), Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		expect: map[types.NamespacedName]map[string]bool{}}
	if _, err := ctrl.Reconcile(ctx, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(pool)}); err != nil {
		t.Fatal(err)
	}
	get = func(name string) *v1alpha1.Sandbox {
		t.Helper()
		var sb v1alpha1.Sandbox
		if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: name}, &sb); err != nil {
			t.Fatalf("get %s: %v", name, err)
		}
		return &sb
	}
	return c, pool, get
}

// TestHardwareClaim: a claim that needs hardware isolation takes over
// only a member on a KVM host, however old the others are.
func TestHardwareClaim(t *testing.T) {
	host := func(name, accel string) *v1alpha1.Host {
		return &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: v1alpha1.HostStatus{Accel: accel}}
	}
	hw := func(sb *v1alpha1.Sandbox) *v1alpha1.Sandbox {
		sb.Spec.Isolation = v1alpha1.IsolationHardware
		return sb
	}
	c, _, get := reconciled(t, host("h-tcg", v1alpha1.AccelTCG), host("h-kvm", v1alpha1.AccelKVM), host("h-tcg2", v1alpha1.AccelTCG),
		member("tcg", 1, true, ""), member("kvm", 2, true, ""), member("tcg2", 3, true, ""),
		hw(claim("hw", 10)), claim("any", 11), hw(claim("hw2", 12)))
	for cl, m := range map[string]string{"hw": "kvm", "any": "tcg"} {
		if got := get(cl).Status.WarmPoolMember; got != m {
			t.Errorf("%s took over %q, want %s", cl, got, m)
		}
	}
	// Only a TCG member is left: the second hardware claim waits, and
	// the member stays in the pool.
	if got := get("hw2"); got.Status.HostName != "" || got.Status.Reason != "WaitingForWarmPool" {
		t.Errorf("hw2: host %q reason %q, want waiting", got.Status.HostName, got.Status.Reason)
	}
	if by := get("tcg2").Annotations[v1alpha1.AnnotationClaimedBy]; by != "" {
		t.Errorf("tcg2 claimed by %q", by)
	}
	// The sandbox made for it needs hardware isolation too, so that the
	// scheduler puts it on a KVM host; the pool's own replicas do not.
	var list v1alpha1.SandboxList
	if err := c.List(context.Background(), &list, client.MatchingLabels{v1alpha1.LabelWarmPool: "p"}); err != nil {
		t.Fatal(err)
	}
	hardware, made := 0, 0
	for _, sb := range list.Items {
		if sb.GenerateName != "" {
			made++
			if sb.Spec.Isolation == v1alpha1.IsolationHardware {
				hardware++
			}
		}
	}
	if made == 0 || hardware != 1 {
		t.Errorf("%d of %d new pool sandboxes need hardware isolation, want 1 (one claim waits for it)", hardware, made)
	}
}

func TestPool(t *testing.T) {
	ctx := context.Background()
	c, pool, get := reconciled(t,
		member("old", 1, true, ""), member("young", 2, true, ""), member("booting", 3, false, ""),
		member("orphan", 0, true, "gone-uid"),
		claim("c1", 10), claim("c2", 11), claim("c3", 12))
	// The oldest claims get the oldest ready members, on their hosts.
	for cl, m := range map[string]string{"c1": "old", "c2": "young"} {
		got := get(cl)
		if got.Status.WarmPoolMember != m || got.Status.HostName != "h-"+m || got.Status.Phase != v1alpha1.PhaseScheduled {
			t.Errorf("%s: member %q host %q phase %s, want %s on h-%s", cl, got.Status.WarmPoolMember, got.Status.HostName, got.Status.Phase, m, m)
		}
		if by := get(m).Annotations[v1alpha1.AnnotationClaimedBy]; by != string(got.UID) {
			t.Errorf("member %s marked claimed by %q, want %s", m, by, got.UID)
		}
	}
	if got := get("c3"); got.Status.HostName != "" || got.Status.Reason != "WaitingForWarmPool" {
		t.Errorf("c3: host %q reason %q, want waiting", got.Status.HostName, got.Status.Reason)
	}
	// The orphan (claimed by a sandbox that is gone) is deleted.
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "orphan"}, &v1alpha1.Sandbox{}); err == nil {
		t.Error("the orphaned member is still there")
	}
	// Refill: 2 replicas + 1 waiting claim = 3 unclaimed wanted; "booting"
	// is one, so two more are made.
	var list v1alpha1.SandboxList
	if err := c.List(ctx, &list, client.MatchingLabels{v1alpha1.LabelWarmPool: "p"}); err != nil {
		t.Fatal(err)
	}
	unclaimed := 0
	for _, sb := range list.Items {
		if sb.Annotations[v1alpha1.AnnotationClaimedBy] == "" {
			unclaimed++
			if sb.GenerateName != "" && (sb.Spec.Source == nil || sb.Spec.Source.Template != "t" || len(sb.OwnerReferences) != 1) {
				t.Errorf("member %s: source %+v owners %v", sb.Name, sb.Spec.Source, sb.OwnerReferences)
			}
		}
	}
	if unclaimed != 3 {
		t.Errorf("%d unclaimed members, want 3", unclaimed)
	}
	var p v1alpha1.WarmPool
	if err := c.Get(ctx, client.ObjectKeyFromObject(pool), &p); err != nil {
		t.Fatal(err)
	}
	if st := p.Status; st.Claimed != 2 || st.Waiting != 1 || st.ReadyReplicas != 0 || st.Refilling != 3 || st.Selector != "hearth.dev/warm-pool=p" {
		t.Errorf("status %+v", st)
	}
}
