package quota

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"hearth.dev/hearth/api/v1alpha1"
)

func TestApplyLimits(t *testing.T) {
	q := func(s string) *resource.Quantity { v := resource.MustParse(s); return &v }
	lr := corev1.LimitRange{ObjectMeta: metav1.ObjectMeta{Name: "small"}, Spec: corev1.LimitRangeSpec{Limits: []corev1.LimitRangeItem{
		{Type: "Container", Max: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Mi")}}, // not ours
		{Type: LimitTypeSandbox,
			Default: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
			Max:     corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("512Mi"), ResourceDisk: resource.MustParse("2Gi")},
			Min:     corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("500m")}},
	}}}
	for _, tc := range []struct {
		name string
		in   v1alpha1.Resources
		want string // the error, or the resources as cpu/memory/disk
	}{
		{"defaults", v1alpha1.Resources{}, "1/128Mi/1Gi"},
		{"given", v1alpha1.Resources{CPU: q("2"), Memory: q("256Mi"), Disk: q("2Gi")}, "2/256Mi/2Gi"},
		{"over the maximum", v1alpha1.Resources{Memory: q("1Gi")}, "spec.resources.memory 1Gi is over the maximum 512Mi of LimitRange small"},
		{"under the minimum", v1alpha1.Resources{CPU: q("100m")}, "spec.resources.cpu 100m is under the minimum 500m of LimitRange small"},
		{"a default disk over the maximum", v1alpha1.Resources{Disk: q("3Gi")}, "spec.resources.disk 3Gi is over the maximum 2Gi"},
	} {
		r := tc.in
		err := ApplyLimits([]corev1.LimitRange{lr}, &r, "spec.resources")
		got := ""
		if err != nil {
			got = err.Error()
		} else {
			got = r.CPU.String() + "/" + r.Memory.String() + "/" + r.Disk.String()
		}
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	// No LimitRange: the cluster's defaults.
	var r v1alpha1.Resources
	if err := ApplyLimits(nil, &r, "spec.resources"); err != nil || r.Memory.String() != "256Mi" || r.CPU.String() != "1" || r.Disk.String() != "1Gi" {
		t.Errorf("without a LimitRange: %v %+v", err, r)
	}
}
