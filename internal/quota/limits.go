package quota

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"hearth.dev/hearth/api/v1alpha1"
)

// LimitTypeSandbox is the LimitRange item type that bounds a sandbox's
// (and a template's) resources: cpu, memory and disk.
const LimitTypeSandbox corev1.LimitType = "Sandbox"

// LimitResources are the resources a Sandbox item may name.
var LimitResources = []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory, ResourceDisk}

// ResourceDisk is a sandbox's writable layer in a LimitRange.
const ResourceDisk corev1.ResourceName = "disk"

// ApplyLimits fills in what r leaves unset, from the first Sandbox item of
// ranges that has a default for it, else the cluster's (v1alpha1.DefaultCPU
// and the rest); then checks each against every item's min and max. path
// is the field's, for the message ("spec.resources").
func ApplyLimits(ranges []corev1.LimitRange, r *v1alpha1.Resources, path string) error {
	fields := []struct {
		name corev1.ResourceName
		q    **resource.Quantity
		def  resource.Quantity
	}{{corev1.ResourceCPU, &r.CPU, v1alpha1.DefaultCPU}, {corev1.ResourceMemory, &r.Memory, v1alpha1.DefaultMemory}, {ResourceDisk, &r.Disk, v1alpha1.DefaultDisk}}
	for _, f := range fields {
		if *f.q != nil {
			continue
		}
		d := f.def.DeepCopy()
		if v, ok := firstDefault(ranges, f.name); ok {
			d = v
		}
		*f.q = &d
	}
	for _, lr := range ranges {
		for _, item := range lr.Spec.Limits {
			if item.Type != LimitTypeSandbox {
				continue
			}
			for _, f := range fields {
				v := **f.q
				if max, ok := item.Max[f.name]; ok && v.Cmp(max) > 0 {
					return fmt.Errorf("%s.%s %s is over the maximum %s of LimitRange %s", path, f.name, v.String(), max.String(), lr.Name)
				}
				if min, ok := item.Min[f.name]; ok && v.Cmp(min) < 0 {
					return fmt.Errorf("%s.%s %s is under the minimum %s of LimitRange %s", path, f.name, v.String(), min.String(), lr.Name)
				}
			}
		}
	}
	return nil
}

func firstDefault(ranges []corev1.LimitRange, name corev1.ResourceName) (resource.Quantity, bool) {
	for _, lr := range ranges {
		for _, item := range lr.Spec.Limits {
			if v, ok := item.Default[name]; ok && item.Type == LimitTypeSandbox {
				return v.DeepCopy(), true
			}
		}
	}
	return resource.Quantity{}, false
}
