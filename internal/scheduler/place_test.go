package scheduler

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"

	"hearth.dev/hearth/api/v1alpha1"
)

func host(name string, cpu string, used string, ready bool, lbls map[string]string) *HostInfo {
	return &HostInfo{
		Name: name, Ready: ready, Labels: lbls,
		Allocatable: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse("8Gi"), v1alpha1.ResourceSandboxes: resource.MustParse("10")},
		Used:        corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(used)},
	}
}

func sandbox(cpu string, sel map[string]string) *v1alpha1.Sandbox {
	return &v1alpha1.Sandbox{Spec: v1alpha1.SandboxSpec{
		Image:        "x",
		HostSelector: sel,
		Resources:    v1alpha1.Resources{CPU: ptr.To(resource.MustParse(cpu))},
	}}
}

func TestPlace(t *testing.T) {
	for _, tc := range []struct {
		name    string
		hosts   []*HostInfo
		sb      *v1alpha1.Sandbox
		want    string
		wantWhy string
	}{
		{"no hosts", nil, sandbox("1", nil), "", "no hosts are registered"},
		{"most free cpu wins", []*HostInfo{host("a", "4", "3", true, nil), host("b", "4", "1", true, nil)}, sandbox("1", nil), "b", ""},
		{"ties by name", []*HostInfo{host("b", "4", "0", true, nil), host("a", "4", "0", true, nil)}, sandbox("1", nil), "a", ""},
		{"full", []*HostInfo{host("a", "2", "1500m", true, nil)}, sandbox("1", nil), "", "0/1 hosts are available: 1 insufficient cpu."},
		{"not ready", []*HostInfo{host("a", "4", "0", false, nil), host("b", "1", "1", true, nil)}, sandbox("1", nil), "",
			"0/2 hosts are available: 1 insufficient cpu, 1 not ready."},
		{"selector", []*HostInfo{host("a", "4", "0", true, map[string]string{"zone": "x"}), host("b", "4", "0", true, map[string]string{"zone": "y"})},
			sandbox("1", map[string]string{"zone": "y"}), "b", ""},
		{"selector matches none", []*HostInfo{host("a", "4", "0", true, nil)}, sandbox("1", map[string]string{"gpu": "yes"}), "",
			"0/1 hosts are available: 1 didn't match the host selector."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := Place(tc.hosts, tc.sb)
			if got != tc.want || why != tc.wantWhy {
				t.Errorf("Place = %q, %q; want %q, %q", got, why, tc.want, tc.wantWhy)
			}
		})
	}
}
