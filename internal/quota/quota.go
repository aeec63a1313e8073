// Package quota decides what a namespace may still create under its
// ResourceQuotas (core/v1, with Kubernetes' semantics: spec.hard bounds,
// status.used is what the namespace holds). It is pure: what an object
// uses, what a namespace uses, and whether a request fits. The API
// server's admission (internal/apiserver/quota.go) and the controller
// that keeps status.used (internal/quota/controller.go) do the I/O.
package quota

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	quotav1 "k8s.io/apiserver/pkg/quota/v1"

	"hearth.dev/hearth/api/v1alpha1"
)

// The resources a quota may bound.
const (
	Sandboxes corev1.ResourceName = "count/sandboxes.hearth.dev"
	Snapshots corev1.ResourceName = "count/snapshots.hearth.dev"
	Templates corev1.ResourceName = "count/sandboxtemplates.hearth.dev"
	WarmPools corev1.ResourceName = "count/warmpools.hearth.dev"
	// WarmPoolReplicas is the sum of the pools' spec.replicas: the VMs
	// they keep booted.
	WarmPoolReplicas corev1.ResourceName = "hearth.dev/warmpool-replicas"
	// What sandboxes ask for, as the scheduler counts it (unset fields at
	// their defaults). cpu and memory are the same as requests.cpu and
	// requests.memory, as in Kubernetes.
	CPU    corev1.ResourceName = "requests.cpu"
	Memory corev1.ResourceName = "requests.memory"
	Disk   corev1.ResourceName = "requests.disk"
)

// Known are the names a quota may use, what its validation accepts.
var Known = []corev1.ResourceName{Sandboxes, Snapshots, Templates, WarmPools, WarmPoolReplicas,
	CPU, Memory, Disk, corev1.ResourceCPU, corev1.ResourceMemory}

// canonical maps Kubernetes' short names to the requests.* ones.
func canonical(n corev1.ResourceName) corev1.ResourceName {
	switch n {
	case corev1.ResourceCPU:
		return CPU
	case corev1.ResourceMemory:
		return Memory
	}
	return n
}

// Objects is what a namespace holds that quotas count.
type Objects struct {
	Sandboxes []v1alpha1.Sandbox
	Snapshots int
	Templates int
	WarmPools []v1alpha1.WarmPool
}

// Sandbox is what one sandbox uses: every sandbox counts until it is
// deleted, a finished one too (its disk and its record stay).
func Sandbox(sb *v1alpha1.Sandbox) corev1.ResourceList {
	cpu, mem, disk := sb.Spec.Resources.Requests()
	return corev1.ResourceList{Sandboxes: *resource.NewQuantity(1, resource.DecimalSI), CPU: cpu, Memory: mem, Disk: disk}
}

// WarmPool is what one pool uses.
func WarmPool(p *v1alpha1.WarmPool) corev1.ResourceList {
	return corev1.ResourceList{WarmPools: *resource.NewQuantity(1, resource.DecimalSI),
		WarmPoolReplicas: *resource.NewQuantity(int64(p.Spec.Replicas), resource.DecimalSI)}
}

// Count is one more of a kind that only counts (snapshots, templates).
func Count(n corev1.ResourceName) corev1.ResourceList {
	return corev1.ResourceList{n: *resource.NewQuantity(1, resource.DecimalSI)}
}

// Used is what a namespace's objects use.
func Used(o Objects) corev1.ResourceList {
	used := corev1.ResourceList{
		Snapshots: *resource.NewQuantity(int64(o.Snapshots), resource.DecimalSI),
		Templates: *resource.NewQuantity(int64(o.Templates), resource.DecimalSI),
	}
	for i := range o.Sandboxes {
		used = quotav1.Add(used, Sandbox(&o.Sandboxes[i]))
	}
	for i := range o.WarmPools {
		used = quotav1.Add(used, WarmPool(&o.WarmPools[i]))
	}
	for _, n := range []corev1.ResourceName{Sandboxes, CPU, Memory, Disk, WarmPools, WarmPoolReplicas} {
		if _, ok := used[n]; !ok {
			used[n] = *resource.NewQuantity(0, resource.DecimalSI)
		}
	}
	return used
}

// Status is a quota's status for what the namespace uses: its hard
// limits, and the use of each (named as in spec.hard).
func Status(hard, used corev1.ResourceList) corev1.ResourceQuotaStatus {
	st := corev1.ResourceQuotaStatus{Hard: hard.DeepCopy(), Used: corev1.ResourceList{}}
	for n := range hard {
		st.Used[n] = used[canonical(n)]
	}
	return st
}

// Exceeded is a request that does not fit a quota: what it asks, what
// the namespace uses, what the quota allows, for the resources past it.
type Exceeded struct {
	Quota                    string
	Requested, Used, Limited corev1.ResourceList
}

func (e *Exceeded) Error() string {
	return fmt.Sprintf("exceeded quota: %s, requested: %s, used: %s, limited: %s", e.Quota, list(e.Requested), list(e.Used), list(e.Limited))
}

func list(l corev1.ResourceList) string {
	var parts []string
	for n, q := range l {
		parts = append(parts, fmt.Sprintf("%s=%s", n, q.String()))
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// Fit adds delta to a quota's status.used, if the result stays within
// its status.hard: the new used, or an *Exceeded naming the quota. A
// resource the quota does not bound is not counted. Unknown, when the
// status does not cover a bounded resource yet, asks the caller to wait
// for the controller.
func Fit(name string, st corev1.ResourceQuotaStatus, delta corev1.ResourceList) (corev1.ResourceList, error) {
	used := st.Used.DeepCopy()
	if used == nil {
		used = corev1.ResourceList{}
	}
	ex := &Exceeded{Quota: name, Requested: corev1.ResourceList{}, Used: corev1.ResourceList{}, Limited: corev1.ResourceList{}}
	for n, hard := range st.Hard {
		d, ok := delta[canonical(n)]
		if !ok || d.Sign() <= 0 {
			continue // what goes is counted by the controller, later
		}
		u, known := st.Used[n]
		if !known {
			return nil, fmt.Errorf("%w: quota %s does not yet count %s", ErrUnknown, name, n)
		}
		sum := u.DeepCopy()
		sum.Add(d)
		if sum.Cmp(hard) > 0 {
			ex.Requested[n], ex.Used[n], ex.Limited[n] = d, u, hard
			continue
		}
		used[n] = sum
	}
	if len(ex.Limited) > 0 {
		return nil, ex
	}
	return used, nil
}

// Reserve is the headroom to charge beyond need (what a batch of creates
// just took), for the creates that follow: factor times need of each
// resource the quota bounds, no more than is left under hard after used
// (which already holds need). What the creates after take from it costs
// no write.
func Reserve(hard, used, need corev1.ResourceList, factor int64) corev1.ResourceList {
	out := corev1.ResourceList{}
	for n, h := range hard {
		d := need[n]
		if d.Sign() <= 0 {
			continue
		}
		left := h.DeepCopy()
		left.Sub(used[n])
		want := d.DeepCopy()
		want.Mul(factor)
		if left.Cmp(want) < 0 {
			want = left
		}
		if want.Sign() > 0 {
			out[n] = want
		}
	}
	return out
}

// Take gives delta from a reserve (keyed as the quota's hard): what is
// left of it, or false if it does not cover delta's part of what the
// quota bounds.
func Take(hard, reserve, delta corev1.ResourceList) (corev1.ResourceList, bool) {
	left := reserve.DeepCopy()
	for n := range hard {
		d := delta[canonical(n)]
		if d.Sign() <= 0 {
			continue
		}
		r, ok := left[n]
		if !ok || r.Cmp(d) < 0 {
			return reserve, false
		}
		r.Sub(d)
		left[n] = r
	}
	return left, true
}

// ErrUnknown is a quota whose usage is not known yet.
var ErrUnknown = fmt.Errorf("quota usage not known yet")
