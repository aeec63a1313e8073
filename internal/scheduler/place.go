// Package scheduler binds pending Sandboxes to Hosts. Placement is a pure
// function from an immutable snapshot of the cluster to a host (Place); the
// controller (controller.go) builds the snapshot from its cache, places the
// pending sandboxes oldest first and writes each binding through the
// sandbox's status subresource, the one path that sets status.hostName.
package scheduler

import (
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"

	"hearth.dev/hearth/api/v1alpha1"
)

// HostInfo is one host as the scheduler sees it.
type HostInfo struct {
	Name        string
	Labels      map[string]string
	Ready       bool
	Cordoned    bool
	Allocatable corev1.ResourceList
	// Used is the sum of the requests of the sandboxes bound to it that
	// have not ended.
	Used corev1.ResourceList
}

// Requests is what a sandbox asks of a host.
func Requests(sb *v1alpha1.Sandbox) corev1.ResourceList {
	cpu, memory, disk := sb.Spec.Resources.Requests()
	return corev1.ResourceList{
		corev1.ResourceCPU:         cpu,
		corev1.ResourceMemory:      memory,
		corev1.ResourceStorage:     disk,
		v1alpha1.ResourceSandboxes: resource.MustParse("1"),
	}
}

// Add adds b to a.
func Add(a, b corev1.ResourceList) {
	for k, v := range b {
		q := a[k]
		q.Add(v)
		a[k] = q
	}
}

// Place picks the host for sb: among the ready, uncordoned hosts that match
// its hostSelector and have room, the one with the most CPU left (spreading
// load); ties by name. It returns "" and why when none fits.
func Place(hosts []*HostInfo, sb *v1alpha1.Sandbox) (string, string) {
	sel := labels.SelectorFromSet(sb.Spec.HostSelector)
	req := Requests(sb)
	var fits []*HostInfo
	why := map[string]int{}
	for _, h := range hosts {
		switch {
		case !h.Ready:
			why["not ready"]++
		case h.Cordoned:
			why["unschedulable"]++
		case !sel.Matches(labels.Set(h.Labels)):
			why["didn't match the host selector"]++
		default:
			if short := insufficient(h, req); short != "" {
				why["insufficient "+short]++
				continue
			}
			fits = append(fits, h)
		}
	}
	if len(fits) == 0 {
		return "", unschedulable(len(hosts), why)
	}
	sort.Slice(fits, func(i, j int) bool {
		a, b := free(fits[i], corev1.ResourceCPU), free(fits[j], corev1.ResourceCPU)
		if c := a.Cmp(b); c != 0 {
			return c > 0
		}
		return fits[i].Name < fits[j].Name
	})
	return fits[0].Name, ""
}

func free(h *HostInfo, r corev1.ResourceName) resource.Quantity {
	q := h.Allocatable[r].DeepCopy()
	q.Sub(h.Used[r])
	return q
}

// insufficient names the first resource h lacks for req.
func insufficient(h *HostInfo, req corev1.ResourceList) string {
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory, corev1.ResourceStorage, v1alpha1.ResourceSandboxes} {
		alloc, ok := h.Allocatable[r]
		if !ok {
			continue
		}
		need := req[r].DeepCopy()
		need.Add(h.Used[r])
		if need.Cmp(alloc) > 0 {
			return string(r)
		}
	}
	return ""
}

// unschedulable says why no host fits, as the Kubernetes scheduler does:
// "0/3 hosts are available: 2 insufficient cpu, 1 not ready."
func unschedulable(n int, why map[string]int) string {
	if n == 0 {
		return "no hosts are registered"
	}
	parts := make([]string, 0, len(why))
	for w, c := range why {
		parts = append(parts, fmt.Sprintf("%d %s", c, w))
	}
	sort.Strings(parts)
	return fmt.Sprintf("0/%d hosts are available: %s.", n, strings.Join(parts, ", "))
}
