package scheduler

import (
	"fmt"
	"strings"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"hearth.dev/hearth/api/v1alpha1"
)

// query is one sandbox's placement, prepared once so that each host is
// filtered and scored with map lookups and integer arithmetic only.
type query struct {
	req         Resources
	selector    labels.Selector
	tolerations []corev1.Toleration
	policy      v1alpha1.Placement
	hardware    bool
	// required are affinity (anti false) and anti-affinity terms that a
	// host must satisfy: its domain must hold matching sandboxes, or none.
	required []domainTerm
	// preferred add weight (anti-affinity: subtract it) where the host's
	// domain holds matching sandboxes.
	preferred []domainTerm
	artifacts []artifact
	// needs is an artifact the host must hold (a snapshot: it is not
	// copied between hosts).
	needs string
}

type artifact struct {
	key   string
	score int64
}

// domainTerm is a term resolved against the snapshot: the number of
// matching sandboxes per domain, and each host's domain.
type domainTerm struct {
	hostDomain []int32
	domains    map[int32]int
	anti       bool
	weight     int64
}

// query prepares sb's placement against the snapshot: it resolves the
// affinity terms to the domains that hold matching sandboxes, including
// the bound sandboxes' own anti-affinity terms that sb matches.
func (s *Snapshot) query(sb *v1alpha1.Sandbox) (*query, error) {
	q := &query{
		req:         Requests(sb),
		selector:    labels.SelectorFromSet(sb.Spec.HostSelector),
		tolerations: sb.Spec.Tolerations,
		policy:      s.Policy,
		hardware:    sb.Spec.Isolation == v1alpha1.IsolationHardware,
	}
	if src := sb.Spec.Source; src != nil && src.Snapshot != "" {
		q.needs = ArtifactSnapshot + sb.Namespace + "/" + src.Snapshot
	}
	for _, key := range ArtifactKeys(sb) {
		for kind, sc := range artifactScore {
			if strings.HasPrefix(key, kind) {
				q.artifacts = append(q.artifacts, artifact{key, sc})
			}
		}
	}
	if sb.Spec.Placement != "" {
		q.policy = sb.Spec.Placement
	}
	if a := sb.Spec.Affinity; a != nil {
		for _, terms := range []struct {
			list []v1alpha1.AffinityTerm
			anti bool
		}{{a.SandboxAffinity, false}, {a.SandboxAntiAffinity, true}} {
			for _, t := range terms.list {
				sel, err := metav1.LabelSelectorAsSelector(t.LabelSelector)
				if err != nil {
					return nil, fmt.Errorf("invalid affinity label selector: %w", err)
				}
				key := topologyKey(t)
				dt := domainTerm{hostDomain: s.topology(key), domains: s.matching(sb.Namespace, sel, key), anti: terms.anti, weight: int64(t.Weight)}
				switch {
				case t.Weight != 0:
					q.preferred = append(q.preferred, dt)
				case !terms.anti && len(dt.domains) == 0 && sel.Matches(labels.Set(sb.Labels)):
					// The first of a group that wants to be together goes
					// anywhere, as in Kubernetes.
				default:
					q.required = append(q.required, dt)
				}
			}
		}
	}
	for _, at := range s.antiTermsFor(sb.Namespace, sb.Labels) {
		if at.namespace != sb.Namespace || !at.selector.Matches(labels.Set(sb.Labels)) {
			continue
		}
		dt := domainTerm{hostDomain: s.topology(at.topologyKey), domains: map[int32]int{}, anti: true}
		for i, n := range at.onHost {
			if d := dt.hostDomain[i]; d != 0 && n > 0 {
				dt.domains[d] += n
			}
		}
		q.required = append(q.required, dt)
	}
	return q, nil
}

// filter says why h cannot take the sandbox, or "" if it can. The checks
// go cheapest first; each failing host counts under its first reason.
func (q *query) filter(i int, h *Host) string {
	switch {
	case !h.Ready:
		return "not ready"
	case h.Cordoned:
		return "unschedulable"
	case q.hardware && !h.Hardware:
		return "without hardware virtualization (TCG)"
	}
	if t := q.untolerated(h, false); t != nil {
		return "untolerated taint " + t.Key
	}
	if !q.selector.Empty() && !q.selector.Matches(labels.Set(h.Labels)) {
		return "didn't match the host selector"
	}
	if q.needs != "" && !h.Artifacts[q.needs] {
		return "didn't hold the snapshot"
	}
	if r := insufficient(h, q.req); r != "" {
		return "insufficient " + r
	}
	for _, t := range q.required {
		d := t.hostDomain[i]
		if t.anti && d != 0 && t.domains[d] > 0 {
			return "didn't match sandbox anti-affinity rules"
		}
		if !t.anti && (d == 0 || t.domains[d] == 0) {
			return "didn't match sandbox affinity rules"
		}
	}
	return ""
}

var discard = logr.Discard()

// untolerated returns the first taint of h that the sandbox does not
// tolerate: of effect NoSchedule or NoExecute, or when prefer is set,
// PreferNoSchedule.
func (q *query) untolerated(h *Host, prefer bool) *corev1.Taint {
	for i := range h.Taints {
		t := &h.Taints[i]
		if (t.Effect == corev1.TaintEffectPreferNoSchedule) != prefer {
			continue
		}
		tolerated := false
		for j := range q.tolerations {
			if q.tolerations[j].ToleratesTaint(discard, t, false) {
				tolerated = true
				break
			}
		}
		if !tolerated {
			return t
		}
	}
	return nil
}

// insufficient names the first resource h lacks for req; a zero
// allocatable is unlimited.
func insufficient(h *Host, req Resources) string {
	a, u := h.Allocatable, h.Used
	switch {
	case a.CPU > 0 && u.CPU+req.CPU > a.CPU:
		return "cpu"
	case a.Memory > 0 && u.Memory+req.Memory > a.Memory:
		return "memory"
	case a.Disk > 0 && u.Disk+req.Disk > a.Disk:
		return "storage"
	case a.Sandboxes > 0 && u.Sandboxes+req.Sandboxes > a.Sandboxes:
		return "sandboxes"
	}
	return ""
}

// Score weights: resources score 0-100 (Spread: the emptier after
// placement, the higher; Binpack: the fuller); artifacts add their
// artifactScore; preferred affinity terms add or subtract their weight; a
// PreferNoSchedule taint not tolerated subtracts preferNoSchedulePenalty.
const preferNoSchedulePenalty = 50

func (q *query) score(i int, h *Host) int64 {
	used := (fraction(h.Used.CPU+q.req.CPU, h.Allocatable.CPU) + fraction(h.Used.Memory+q.req.Memory, h.Allocatable.Memory)) / 2
	sc := 100 - used
	if q.policy == v1alpha1.PlacementBinpack {
		sc = used
	}
	for _, a := range q.artifacts {
		if h.Artifacts[a.key] {
			sc += a.score
		}
	}
	for _, t := range q.preferred {
		if d := t.hostDomain[i]; d != 0 && t.domains[d] > 0 {
			if t.anti {
				sc -= t.weight
			} else {
				sc += t.weight
			}
		}
	}
	if len(h.Taints) > 0 && q.untolerated(h, true) != nil {
		sc -= preferNoSchedulePenalty
	}
	return sc
}

// fraction is used/alloc in percent; an unlimited resource counts as
// empty.
func fraction(used, alloc int64) int64 {
	if alloc <= 0 {
		return 0
	}
	return min(100, used*100/alloc)
}
