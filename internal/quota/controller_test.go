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

	"hearth.dev/hearth/internal/scheme"
)

// TestChargeGrace: just after admission charged a create whose object the
// cache does not show yet, the recount does not hand the charge back;
// after the grace it corrects used to what there is.
func TestChargeGrace(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	hard := corev1.ResourceList{Sandboxes: resource.MustParse("2")}
	q := &corev1.ResourceQuota{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "q", Annotations: map[string]string{ChargedAt: now.Format(time.RFC3339Nano)}},
		Spec:       corev1.ResourceQuotaSpec{Hard: hard},
		Status:     corev1.ResourceQuotaStatus{Hard: hard, Used: corev1.ResourceList{Sandboxes: resource.MustParse("1")}},
	}
	cl := fake.NewClientBuilder().WithScheme(scheme.Scheme).WithObjects(q).Build()
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
	if used() != "1" {
		t.Errorf("within the grace: used %s, want the charge kept (1)", used())
	}
	if res.RequeueAfter > ChargeGrace {
		t.Errorf("requeued after %s, want within the grace", res.RequeueAfter)
	}
	at = now.Add(ChargeGrace + time.Second)
	if _, err := c.Reconcile(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if used() != "0" {
		t.Errorf("after the grace: used %s, want the recount (0)", used())
	}
}
