package quota

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"hearth.dev/hearth/api/v1alpha1"
)

func sandbox(cpu, mem string) v1alpha1.Sandbox {
	c, m := resource.MustParse(cpu), resource.MustParse(mem)
	return v1alpha1.Sandbox{Spec: v1alpha1.SandboxSpec{Resources: v1alpha1.Resources{CPU: &c, Memory: &m}}}
}

func TestFit(t *testing.T) {
	hard := corev1.ResourceList{Sandboxes: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("1Gi")}
	used := Used(Objects{Sandboxes: []v1alpha1.Sandbox{sandbox("1", "512Mi")}})
	st := Status(hard, used)
	if q := st.Used[Sandboxes]; q.Value() != 1 {
		t.Fatalf("used sandboxes %s, want 1", q.String())
	}
	if q := st.Used[corev1.ResourceMemory]; q.Cmp(resource.MustParse("512Mi")) != 0 {
		t.Fatalf("used memory (as named in hard) %s, want 512Mi", q.String())
	}
	small := sandbox("1", "256Mi")
	after, err := Fit("q", st, Sandbox(&small))
	if err != nil {
		t.Fatalf("a sandbox that fits: %v", err)
	}
	if q := after[Sandboxes]; q.Value() != 2 {
		t.Errorf("used after: %v", after)
	}
	st.Used = after
	// The third sandbox: past the count.
	_, err = Fit("q", st, Sandbox(&small))
	var ex *Exceeded
	if !errors.As(err, &ex) || !strings.Contains(err.Error(), "exceeded quota: q, requested: count/sandboxes.hearth.dev=1, used: count/sandboxes.hearth.dev=2, limited: count/sandboxes.hearth.dev=2") {
		t.Errorf("the third: %v", err)
	}
	// Memory past its bound, the count within.
	st = Status(hard, used)
	big := sandbox("1", "768Mi")
	if _, err := Fit("q", st, Sandbox(&big)); !errors.As(err, &ex) || ex.Limited[corev1.ResourceMemory] != hard[corev1.ResourceMemory] {
		t.Errorf("over memory: %v", err)
	}
	// A status that does not count what the quota bounds yet.
	if _, err := Fit("q", corev1.ResourceQuotaStatus{Hard: hard}, Sandbox(&small)); !errors.Is(err, ErrUnknown) {
		t.Errorf("unknown usage: %v", err)
	}
	// What the quota does not bound does not count; shrinking always fits.
	if _, err := Fit("q", st, corev1.ResourceList{Disk: resource.MustParse("1Ti"), Memory: resource.MustParse("-1Gi")}); err != nil {
		t.Errorf("unbounded and negative: %v", err)
	}
}

func TestReserveAndTake(t *testing.T) {
	hard := corev1.ResourceList{Sandboxes: resource.MustParse("10"), corev1.ResourceMemory: resource.MustParse("1Gi")}
	used := corev1.ResourceList{Sandboxes: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("256Mi")}
	need := corev1.ResourceList{Sandboxes: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("128Mi")}
	r := Reserve(hard, used, need, 8)
	// 8 more sandboxes by need, 768Mi by what is left under hard.
	if q := r[Sandboxes]; q.Value() != 8 {
		t.Errorf("reserved sandboxes %s, want 8", q.String())
	}
	if q := r[corev1.ResourceMemory]; q.Cmp(resource.MustParse("768Mi")) != 0 {
		t.Errorf("reserved memory %s, want 768Mi (all that is left)", q.String())
	}
	one := sandbox("1", "256Mi")
	left := r
	for i := range 3 {
		var ok bool
		if left, ok = Take(hard, left, Sandbox(&one)); !ok {
			t.Fatalf("take %d from %v", i, left)
		}
	}
	if _, ok := Take(hard, left, Sandbox(&one)); ok {
		t.Errorf("a fourth 256Mi sandbox taken from what is left of 768Mi: %v", left)
	}
	// Nothing left under hard: nothing reserved.
	if r := Reserve(hard, hard, need, 8); len(r) != 0 {
		t.Errorf("reserved past hard: %v", r)
	}
}
