package migration

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"hearth.dev/hearth/api/v1alpha1"
)

func host(name string, cpu string, ready, cordoned bool) v1alpha1.Host {
	h := v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"hearth.dev/hostname": name}}}
	h.Spec.Unschedulable = cordoned
	h.Status.Allocatable = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse("8Gi"),
		corev1.ResourceStorage: resource.MustParse("100Gi"), v1alpha1.ResourceSandboxes: resource.MustParse("100")}
	status := metav1.ConditionFalse
	if ready {
		status = metav1.ConditionTrue
	}
	h.Status.Conditions = []metav1.Condition{{Type: v1alpha1.HostConditionReady, Status: status}}
	return h
}

func running(name, on, cpu string) v1alpha1.Sandbox {
	sb := v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: v1alpha1.SandboxSpec{Image: "img", Resources: v1alpha1.Resources{CPU: ptr.To(resource.MustParse(cpu))}}}
	sb.Status.Phase, sb.Status.HostName = v1alpha1.PhaseRunning, on
	return sb
}

func TestTarget(t *testing.T) {
	hosts := []v1alpha1.Host{host("h1", "4", true, false), host("h2", "4", true, false), host("h3", "4", true, false),
		host("down", "64", false, false), host("cordoned", "64", true, true)}
	sb := running("s", "h1", "2")
	// h2 is busier than h3: the default spread picks h3.
	others := []v1alpha1.Sandbox{sb, running("x", "h2", "1")}
	for _, tc := range []struct {
		name, want, to, why string
		sb                  v1alpha1.Sandbox
		others              []v1alpha1.Sandbox
		incoming            map[types.UID]string
	}{
		{name: "the scheduler's choice, never the source", sb: sb, others: others, to: "h3"},
		{name: "a named host", sb: sb, others: others, want: "h2", to: "h2"},
		{name: "the host it runs on", sb: sb, others: others, want: "h1", why: "already runs on h1"},
		{name: "no such host", sb: sb, others: others, want: "nope", why: `spec.targetHost: there is no host "nope"`},
		{name: "a host that is down", sb: sb, others: others, want: "down", why: "no host can take it"},
		{name: "a cordoned host", sb: sb, others: others, want: "cordoned", why: "no host can take it"},
		{name: "room taken by a sandbox migrating in", sb: running("big", "h1", "3"), others: []v1alpha1.Sandbox{running("y", "h2", "1"), running("z", "h1", "2")},
			incoming: map[types.UID]string{"uid-z": "h3"}, to: "h2"},
		{name: "too big for the others", sb: running("big", "h1", "4"), others: []v1alpha1.Sandbox{running("y", "h2", "1"), running("z", "h3", "1")},
			why: "no host can take it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			to, why := Target(hosts, tc.others, tc.incoming, &tc.sb, tc.want, "")
			if to != tc.to || (tc.why == "") != (why == "") || !strings.Contains(why, tc.why) {
				t.Errorf("Target = %q, %q; want %q, %q", to, why, tc.to, tc.why)
			}
		})
	}
	if to, why := Target([]v1alpha1.Host{host("h1", "4", true, false)}, nil, nil, &sb, "", ""); to != "" || !strings.Contains(why, "no host but h1") {
		t.Errorf("a single host: %q, %q", to, why)
	}
}

func TestRefusal(t *testing.T) {
	ok := running("s", "h1", "1")
	pending := running("s", "", "1")
	pending.Status.Phase = v1alpha1.PhasePending
	fork := running("s", "h1", "1")
	fork.Spec.Source = &v1alpha1.SandboxSource{Snapshot: "snap"}
	member := running("s", "h1", "1")
	member.Status.WarmPoolMember = "pool-abc"
	deleting := running("s", "h1", "1")
	deleting.DeletionTimestamp = ptr.To(metav1.Now())
	for _, tc := range []struct {
		name   string
		sb     v1alpha1.Sandbox
		reason string
	}{
		{"running", ok, ""},
		{"pending", pending, "NotRunning"},
		{"a fork", fork, "Unsupported"},
		{"a warm pool claim", member, "Unsupported"},
		{"being deleted", deleting, "SandboxGone"},
	} {
		if reason, why := Refusal(&tc.sb); reason != tc.reason || (reason != "" && why == "") {
			t.Errorf("%s: %q, %q; want %q", tc.name, reason, why, tc.reason)
		}
	}
}

// One migration of a sandbox at a time: the others wait, oldest first.
func TestAhead(t *testing.T) {
	at := func(name, sandbox string, age time.Duration, phase v1alpha1.MigrationPhase) v1alpha1.Migration {
		m := v1alpha1.Migration{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(name),
			CreationTimestamp: metav1.NewTime(time.Unix(1e9, 0).Add(-age))}, Spec: v1alpha1.MigrationSpec{Sandbox: sandbox}}
		m.Status.Phase = phase
		return m
	}
	done := at("done", "s", time.Hour, v1alpha1.MigrationSucceeded)
	done.Status.Bound = true
	all := []v1alpha1.Migration{
		done,
		at("older", "s", time.Minute, v1alpha1.MigrationPending),
		at("me", "s", 0, ""),
		at("other-sandbox", "t", time.Hour, v1alpha1.MigrationCopying),
	}
	if got := Ahead(&all[2], all); got != "older" {
		t.Errorf("behind a pending older one: %q", got)
	}
	if got := Ahead(&all[1], all); got != "" {
		t.Errorf("the oldest pending: waits for %q", got)
	}
	young := at("young", "s", -time.Minute, v1alpha1.MigrationCopying)
	if got := Ahead(&all[1], append(all, young)); got != "young" {
		t.Errorf("behind one under way, though younger: %q", got)
	}
	switched := at("switched", "s", -time.Minute, v1alpha1.MigrationSucceeded)
	if got := Ahead(&all[1], append(all, switched)); got != "switched" {
		t.Errorf("behind one switched and not bound yet: %q", got)
	}
}

func TestCrowded(t *testing.T) {
	m := func(src, dst string, phase v1alpha1.MigrationPhase, bound bool) v1alpha1.Migration {
		var x v1alpha1.Migration
		x.Status.SourceHost, x.Status.TargetHost, x.Status.Phase, x.Status.Bound = src, dst, phase, bound
		return x
	}
	all := []v1alpha1.Migration{
		m("h1", "h2", v1alpha1.MigrationCopying, false),
		m("h3", "h2", v1alpha1.MigrationSucceeded, false), // switched, not bound: still h2's
		m("h1", "h4", v1alpha1.MigrationSucceeded, true),  // done
		m("h1", "h4", v1alpha1.MigrationFailed, false),
	}
	if why := Crowded(all, "h1", "h2"); !strings.Contains(why, "host h2 takes part in 2") {
		t.Errorf("into h2: %q", why)
	}
	if why := Crowded(all, "h1", "h4"); why != "" {
		t.Errorf("h1 to h4: %q", why)
	}
}
