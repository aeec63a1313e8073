package quota

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/scheme"
)

// TestLedger: a recount just after admission charged a create whose
// object the cache does not show yet counts the charge; once the grace
// has passed, only the objects. A delete is credited at once, however
// many charges keep coming.
func TestLedger(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	hard := corev1.ResourceList{Sandboxes: resource.MustParse("10")}
	one := corev1.ResourceList{Sandboxes: resource.MustParse("1")}
	ledger := Record(nil, now, one)
	q := &corev1.ResourceQuota{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "q", Annotations: map[string]string{Charges: ledger}},
		Spec:       corev1.ResourceQuotaSpec{Hard: hard},
		Status:     corev1.ResourceQuotaStatus{Hard: hard, Used: corev1.ResourceList{Sandboxes: resource.MustParse("3")}},
	}
	// Two sandboxes stored; the third, charged, is on its way.
	sb := func(name string) *v1alpha1.Sandbox {
		return &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name}}
	}
	cl := fake.NewClientBuilder().WithScheme(scheme.Scheme).WithObjects(q, sb("a"), sb("b")).Build()
	at := now.Add(time.Second)
	c := &Controller{Client: cl, Now: func() time.Time { return at }}
	used := func() string {
		var got corev1.ResourceQuota
		if err := cl.Get(context.Background(), types.NamespacedName{Namespace: "ns", Name: "q"}, &got); err != nil {
			t.Fatal(err)
		}
		u := got.Status.Used[Sandboxes]
		return u.String()
	}
	req := reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "ns", Name: "q"}}
	res, err := c.Reconcile(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if used() != "3" {
		t.Errorf("within the grace: used %s, want the 2 objects and the recent charge (3)", used())
	}
	if res.RequeueAfter > ChargeGrace+time.Second {
		t.Errorf("requeued after %s, want when the charge leaves the grace", res.RequeueAfter)
	}
	// b is deleted: credited at once, the recent charge still counted.
	if err := cl.Delete(context.Background(), sb("b")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reconcile(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if used() != "2" {
		t.Errorf("after a delete, within the grace: used %s, want 2", used())
	}
	at = now.Add(ChargeGrace + 2*time.Second)
	if _, err := c.Reconcile(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if used() != "1" {
		t.Errorf("after the grace: used %s, want the objects alone (1)", used())
	}
}

func TestRecord(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	one := corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi"), Sandboxes: resource.MustParse("-1")}
	l := ParseLedger(map[string]string{Charges: Record(nil, now, one)})
	l = ParseLedger(map[string]string{Charges: Record(l, now.Add(300*time.Millisecond), one)})
	if len(l) != 1 {
		t.Fatalf("two charges in one second: %d buckets", len(l))
	}
	sum, _ := Recent(l, now.Add(time.Second))
	if q := sum[Memory]; q.Cmp(resource.MustParse("2Gi")) != 0 {
		t.Errorf("recent memory %s (under its canonical name), want 2Gi", q.String())
	}
	if _, ok := sum[Sandboxes]; ok {
		t.Errorf("a negative charge recorded: %v", sum)
	}
	// A bucket from the future (a clock set back) counts for nothing.
	if sum, _ := Recent(l, now.Add(-time.Hour)); len(sum) != 0 {
		t.Errorf("a bucket an hour ahead of the clock counted: %v", sum)
	}
	l = ParseLedger(map[string]string{Charges: Record(l, now.Add(10*time.Second), one)})
	if len(l) != 1 || !l[0].At.Equal(now.Add(10*time.Second)) {
		t.Errorf("old buckets kept: %+v", l)
	}
}
