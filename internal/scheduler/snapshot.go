package scheduler

import (
	"math"
	"slices"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"

	"hearth.dev/hearth/api/v1alpha1"
)

// Resources are amounts in the units placement compares: CPU in
// millicores, memory and disk in bytes, and a count of sandboxes.
type Resources struct {
	CPU, Memory, Disk, Sandboxes int64
}

func (r *Resources) add(o Resources) {
	r.CPU += o.CPU
	r.Memory += o.Memory
	r.Disk += o.Disk
	r.Sandboxes += o.Sandboxes
}

// Requests is what a sandbox asks of a host. Its disk is its writable
// disk and, for a sandbox that boots, its memory too: a booted VM's RAM
// is a file in the host's VM directory (so that it can be snapshotted),
// reserved there whole (sandbox.Runtime.Reserve). One started from a
// snapshot, a template or a warm pool maps its snapshot's memory instead.
func Requests(sb *v1alpha1.Sandbox) Resources {
	cpu, memory, disk := sb.Spec.Resources.Requests()
	d := disk.Value()
	if sb.Spec.Source == nil {
		// The API sets no maximum: 8Ei of each must not wrap negative
		// and fit anywhere.
		d = min(d, math.MaxInt64-memory.Value()) + memory.Value()
	}
	return Resources{CPU: cpu.MilliValue(), Memory: memory.Value(), Disk: d, Sandboxes: 1}
}

// Host is one host as placement sees it.
type Host struct {
	Name   string
	Labels map[string]string
	// Ready: its agent heartbeats. Cordoned: spec.unschedulable.
	Ready, Cordoned bool
	// Hardware: its guests run under hardware virtualization (KVM), not
	// TCG's software emulation.
	Hardware bool
	Taints   []corev1.Taint
	// Allocatable is what sandboxes may ask of it in all, overcommit
	// applied; a zero field is not limited.
	Allocatable Resources
	// Used is the sum of the requests of the sandboxes bound to it that
	// have not ended.
	Used Resources
	// Artifacts it holds, which make starting a sandbox there cheaper:
	// see ArtifactKeys.
	Artifacts map[string]bool
}

// HostFrom makes a placement Host of an API Host: allocatable times the
// host's overcommit ratios, and the images it holds.
func HostFrom(h *v1alpha1.Host, ready bool) *Host {
	alloc := h.Status.Allocatable
	scaled := func(r corev1.ResourceName, milli bool) int64 {
		q, ok := alloc[r]
		if !ok {
			return 0
		}
		v := q.Value()
		if milli {
			v = q.MilliValue()
		}
		if ratio, ok := h.Spec.Overcommit[r]; ok && ratio.Sign() > 0 {
			v = v * ratio.MilliValue() / 1000
		}
		return v
	}
	out := &Host{
		Name: h.Name, Labels: h.Labels, Ready: ready, Cordoned: h.Spec.Unschedulable, Taints: h.Spec.Taints,
		Hardware: h.Status.Accel == v1alpha1.AccelKVM,
		Allocatable: Resources{
			CPU:       scaled(corev1.ResourceCPU, true),
			Memory:    scaled(corev1.ResourceMemory, false),
			Disk:      scaled(corev1.ResourceStorage, false),
			Sandboxes: scaled(v1alpha1.ResourceSandboxes, false),
		},
	}
	if n := len(h.Status.Images) + len(h.Status.Snapshots) + len(h.Status.Templates); n > 0 {
		out.Artifacts = make(map[string]bool, n)
		for _, kind := range []struct {
			prefix string
			held   []string
		}{{ArtifactImage, h.Status.Images}, {ArtifactSnapshot, h.Status.Snapshots}, {ArtifactTemplate, h.Status.Templates}} {
			for _, x := range kind.held {
				out.Artifacts[kind.prefix+x] = true
			}
		}
	}
	return out
}

// Kinds of artifacts a host may hold, as prefixes of Host.Artifacts keys,
// with the score a host holding them gets: a warm pool's sandbox starts at
// once, a snapshot restores in milliseconds, a template needs its snapshot
// made, an image needs only converting skipped.
const (
	ArtifactImage    = "image/"
	ArtifactTemplate = "template/"
	ArtifactSnapshot = "snapshot/"
	ArtifactWarmPool = "warmpool/"
)

var artifactScore = map[string]int64{ArtifactImage: 10, ArtifactTemplate: 20, ArtifactSnapshot: 30, ArtifactWarmPool: 40}

// ArtifactKeys are the artifacts a sandbox would start faster from. (A
// warm pool's claims are bound by the pool's controller, to the host of
// the pool's sandbox they take; a snapshot is required, not preferred.)
func ArtifactKeys(sb *v1alpha1.Sandbox) []string {
	keys := []string{ArtifactImage + sb.Spec.Image}
	if src := sb.Spec.Source; src != nil && src.Template != "" {
		keys = append(keys, ArtifactTemplate+sb.Namespace+"/"+src.Template)
	}
	return keys
}

// Snapshot is the cluster as placement sees it: the hosts, what is bound
// to them, and an index of the bound sandboxes' labels for affinity. Place
// only reads it; Assume records a decision, so that the next placement of
// the same pass sees it (as kube-scheduler assumes a pod in its cache).
type Snapshot struct {
	Hosts []*Host
	// Policy is the default placement: Spread unless set.
	Policy v1alpha1.Placement
	// Sample caps how many fitting hosts Place scores; 0 lets it choose
	// (all of a small cluster, a few hundred of a large one).
	Sample int

	byName map[string]int
	// groups are the bound sandboxes by namespace and label set: replicas
	// share labels, so a selector is matched against a few groups rather
	// than every sandbox.
	groups map[string]*group
	// byLabel indexes groups by namespace and one label, "ns\x00k=v".
	byLabel map[string][]*group
	// byNamespace lists the groups of each namespace.
	byNamespace map[string][]*group
	// antiTerms are the required anti-affinity terms of bound sandboxes,
	// which keep matching sandboxes out of their domains (symmetry), by
	// their key; antiByLabel indexes them by namespace and a label their
	// selector requires ("ns\x00k=v"), antiOther those requiring none.
	antiTerms   map[string]*antiTerm
	antiByLabel map[string][]*antiTerm
	antiOther   []*antiTerm
	topo        map[string][]int32
}

type group struct {
	namespace string
	labels    labels.Set
	onHost    map[int]int // host index -> sandboxes
}

type antiTerm struct {
	namespace   string
	selector    labels.Selector
	topologyKey string
	onHost      map[int]int
}

// NewSnapshot makes a snapshot of hosts with nothing bound yet; Assume
// adds what is.
func NewSnapshot(hosts []*Host, policy v1alpha1.Placement) *Snapshot {
	s := &Snapshot{Hosts: hosts, Policy: policy, byName: make(map[string]int, len(hosts)),
		groups: map[string]*group{}, byLabel: map[string][]*group{}, byNamespace: map[string][]*group{},
		antiTerms: map[string]*antiTerm{}, antiByLabel: map[string][]*antiTerm{}}
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name < hosts[j].Name })
	for i, h := range hosts {
		s.byName[h.Name] = i
	}
	return s
}

// Host returns the named host, or nil.
func (s *Snapshot) Host(name string) *Host {
	if i, ok := s.byName[name]; ok {
		return s.Hosts[i]
	}
	return nil
}

// Assume records sb as bound to the named host (bound already, or just
// decided): its requests count against the host and its labels and
// anti-affinity terms against others' placement.
func (s *Snapshot) Assume(sb *v1alpha1.Sandbox, host string) {
	i, ok := s.byName[host]
	if !ok {
		return
	}
	s.Hosts[i].Used.add(Requests(sb))
	key := groupKey(sb.Namespace, sb.Labels)
	g := s.groups[key]
	if g == nil {
		g = &group{namespace: sb.Namespace, labels: labels.Set(sb.Labels), onHost: map[int]int{}}
		s.groups[key] = g
		s.byNamespace[sb.Namespace] = append(s.byNamespace[sb.Namespace], g)
		for k, v := range sb.Labels {
			lk := sb.Namespace + "\x00" + k + "=" + v
			s.byLabel[lk] = append(s.byLabel[lk], g)
		}
	}
	g.onHost[i]++
	if sb.Spec.Affinity == nil {
		return
	}
	for _, t := range sb.Spec.Affinity.SandboxAntiAffinity {
		if t.Weight != 0 {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(t.LabelSelector)
		if err != nil {
			continue
		}
		key := sb.Namespace + "\x00" + topologyKey(t) + "\x00" + sel.String()
		at := s.antiTerms[key]
		if at == nil {
			at = &antiTerm{namespace: sb.Namespace, selector: sel, topologyKey: topologyKey(t), onHost: map[int]int{}}
			s.antiTerms[key] = at
			if k, v, ok := requiredLabel(sel); ok {
				lk := sb.Namespace + "\x00" + k + "=" + v
				s.antiByLabel[lk] = append(s.antiByLabel[lk], at)
			} else {
				s.antiOther = append(s.antiOther, at)
			}
		}
		at.onHost[i]++
	}
}

// requiredLabel returns a label that every sandbox sel matches has.
func requiredLabel(sel labels.Selector) (string, string, bool) {
	reqs, _ := sel.Requirements()
	for _, r := range reqs {
		if op := r.Operator(); (op == selection.Equals || op == selection.DoubleEquals || op == selection.In) && r.Values().Len() == 1 {
			return r.Key(), r.Values().UnsortedList()[0], true
		}
	}
	return "", "", false
}

// antiTermsFor lists the bound sandboxes' anti-affinity terms that may
// match a sandbox of ns with labels l.
func (s *Snapshot) antiTermsFor(ns string, l map[string]string) []*antiTerm {
	out := slices.Clip(s.antiOther) // appends copy, never write into antiOther
	for k, v := range l {
		out = append(out, s.antiByLabel[ns+"\x00"+k+"="+v]...)
	}
	return out
}

func groupKey(ns string, l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(ns)
	for _, k := range keys {
		b.WriteString("\x00" + k + "=" + l[k])
	}
	return b.String()
}

func topologyKey(t v1alpha1.AffinityTerm) string {
	if t.TopologyKey == "" {
		return v1alpha1.LabelHostname
	}
	return t.TopologyKey
}

// domain is the host's value of a topology key ("" when it has none); the
// hostname key always has one.
func (h *Host) domain(key string) string {
	if v, ok := h.Labels[key]; ok {
		return v
	}
	if key == v1alpha1.LabelHostname {
		return h.Name
	}
	return ""
}

// topology numbers the hosts' domains of a key: host i is in domain
// ids[i], the same number for the same value, 0 for none. Placement
// compares these numbers rather than label strings. It is a cache,
// computed on first use of a key.
func (s *Snapshot) topology(key string) []int32 {
	if ids, ok := s.topo[key]; ok {
		return ids
	}
	ids := make([]int32, len(s.Hosts))
	seen := map[string]int32{}
	for i, h := range s.Hosts {
		d := h.domain(key)
		if d == "" {
			continue
		}
		id, ok := seen[d]
		if !ok {
			id = int32(len(seen) + 1)
			seen[d] = id
		}
		ids[i] = id
	}
	if s.topo == nil {
		s.topo = map[string][]int32{}
	}
	s.topo[key] = ids
	return ids
}

// matching counts the bound sandboxes of ns that sel matches, per domain
// of key (as numbered by topology). It looks only at groups that can
// match: those holding a label the selector requires, when it requires one.
func (s *Snapshot) matching(ns string, sel labels.Selector, key string) map[int32]int {
	candidates := s.byNamespace[ns]
	if reqs, ok := sel.Requirements(); ok {
		for _, r := range reqs {
			if r.Operator() != selection.Equals && r.Operator() != selection.DoubleEquals && r.Operator() != selection.In {
				continue
			}
			var union []*group
			for v := range r.Values() {
				union = append(union, s.byLabel[ns+"\x00"+r.Key()+"="+v]...)
			}
			if len(union) < len(candidates) {
				candidates = union
			}
		}
	}
	ids := s.topology(key)
	counts := map[int32]int{}
	for _, g := range candidates {
		if !sel.Matches(g.labels) {
			continue
		}
		for i, n := range g.onHost {
			if d := ids[i]; d != 0 && n > 0 {
				counts[d] += n
			}
		}
	}
	return counts
}
