package e2e

import (
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// sb is a Sandbox manifest: a long sleep in img with 1 CPU and 128 MiB,
// plus extra spec lines (indented by two spaces) and labels.
func sb(name, img, labels string, extra ...string) string {
	if labels == "" {
		labels = "{}"
	}
	return fmt.Sprintf(`apiVersion: hearth.dev/v1alpha1
kind: Sandbox
metadata:
  name: %s
  labels: %s
spec:
  image: %s
  command: [sleep, "3600"]
  resources: {cpu: "1", memory: 128Mi}
%s
---
`, name, labels, img, strings.Join(extra, "\n"))
}

func (m *multiHost) apply(manifests ...string) {
	m.t.Helper()
	m.mustKubectlIn(strings.Join(manifests, ""), "apply", "-f", "-")
}

// layout is how many of the named sandboxes each host has, "host-1=2 ...".
func (m *multiHost) layout(names ...string) string {
	m.t.Helper()
	count := map[string]int{}
	for _, n := range names {
		count[m.hostOf(n)]++
	}
	var parts []string
	for h, n := range count {
		parts = append(parts, fmt.Sprintf("%s=%d", h, n))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func (m *multiHost) deleteAll() {
	m.t.Helper()
	m.mustKubectl("delete", "sandboxes", "--all", "--timeout=2m")
}

// waitMessage waits until the sandbox's status message is want.
func (m *multiHost) waitMessage(name, want string) {
	m.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		got := m.field(name, ".status.message")
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("sandbox %s says %q, want %q", name, got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestScheduling runs the scheduler against three real node agents, each
// in its own network namespace: spread and binpack layouts, anti-affinity,
// a host selector, a sandbox that fits nowhere until room frees, a host
// that dies and comes back, and a drain.
func TestScheduling(t *testing.T) {
	h := newHarness(t)
	m := startMultiHost(t, h, 3, []string{"--host-timeout", "4s", "--host-lost-after", "3s"}, func(i int) []string {
		return []string{"--node-cpu", "2", "--node-memory", "4Gi", "--max-sandboxes", "4", "--zone", fmt.Sprintf("z%d", i), "--heartbeat-interval", "1s"}
	})
	img := testenv.OCILayout(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}), "sched")

	t.Log("spread: one sandbox per host")
	m.apply(sb("s1", img, ""), sb("s2", img, ""), sb("s3", img, ""))
	if got := m.layout("s1", "s2", "s3"); got != "host-1=1 host-2=1 host-3=1" {
		t.Errorf("spread layout %q", got)
	}
	for _, n := range []string{"s1", "s2", "s3"} {
		m.waitPhase(n, 3*time.Minute, "Running")
	}
	m.deleteAll()

	t.Log("binpack: fill hosts in turn")
	bp := "  placement: Binpack"
	m.apply(sb("b1", img, "", bp), sb("b2", img, "", bp), sb("b3", img, "", bp), sb("b4", img, "", bp))
	if got := m.layout("b1", "b2", "b3", "b4"); got != "host-1=2 host-2=2" {
		t.Errorf("binpack layout %q", got)
	}
	m.deleteAll()

	t.Log("anti-affinity: replicas on different hosts, even under binpack")
	anti := `  placement: Binpack
  affinity:
    sandboxAntiAffinity:
    - labelSelector: {matchLabels: {app: web}}
      topologyKey: hearth.dev/hostname`
	web := "{app: web}"
	m.apply(sb("r1", img, web, anti), sb("r2", img, web, anti), sb("r3", img, web, anti))
	if got := m.layout("r1", "r2", "r3"); got != "host-1=1 host-2=1 host-3=1" {
		t.Errorf("anti-affinity layout %q", got)
	}
	m.apply(sb("r4", img, web, anti))
	m.waitMessage("r4", "0/3 hosts are available: 3 didn't match sandbox anti-affinity rules.")
	m.deleteAll()

	t.Log("host selector")
	m.apply(sb("z", img, "", "  hostSelector: {topology.hearth.dev/zone: z3}"))
	if got := m.hostOf("z"); got != "host-3" {
		t.Errorf("hostSelector zone z3: bound to %s", got)
	}
	// A binding is never moved to another host in one write.
	out, err := m.kubectl("patch", "sandbox", "z", "--subresource=status", "--type=merge", "-p", `{"status":{"hostName":"host-1"}}`)
	if err == nil || !strings.Contains(out, "never changed to another host") {
		t.Errorf("moving a binding: %v %s", err, out)
	}
	m.deleteAll()

	t.Log("fits nowhere until room frees")
	m.apply(sb("f1", img, ""), sb("f2", img, ""), sb("f3", img, ""))
	if got := m.layout("f1", "f2", "f3"); got != "host-1=1 host-2=1 host-3=1" {
		t.Fatalf("fillers' layout %q", got)
	}
	f2host := m.hostOf("f2")
	m.apply(strings.Replace(sb("big", img, ""), `cpu: "1"`, `cpu: "2"`, 1))
	m.waitMessage("big", "0/3 hosts are available: 3 insufficient cpu.")
	if p := m.field("big", ".status.phase"); p != "Pending" {
		t.Errorf("big is %q, want Pending", p)
	}
	m.mustKubectl("delete", "sandbox", "f2")
	if got := m.hostOf("big"); got != f2host {
		t.Errorf("big bound to %s once %s had room", got, f2host)
	}
	m.deleteAll()

	t.Log("a host dies: its sandboxes come back elsewhere, and not twice when it returns")
	for _, other := range []string{"host-1", "host-3"} {
		if r := m.hearth("", "host", "cordon", other); r.code != 0 {
			t.Fatalf("cordon: %s", r.stderr)
		}
	}
	m.apply(sb("always", img, "", "  restartPolicy: Always"), sb("never", img, ""))
	for _, n := range []string{"always", "never"} {
		if got := m.hostOf(n); got != "host-2" {
			t.Fatalf("%s bound to %s with the other hosts cordoned", n, got)
		}
		m.waitPhase(n, 3*time.Minute, "Running")
	}
	for _, other := range []string{"host-1", "host-3"} {
		if r := m.hearth("", "host", "uncordon", other); r.code != 0 {
			t.Fatalf("uncordon: %s", r.stderr)
		}
	}
	host2 := m.hosts[1]
	uid := m.field("always", ".metadata.uid")
	staleDir := filepath.Join(host2.dataDir, "node", "sandboxes", uid)
	if len(vmm.Pids(staleDir)) == 0 {
		t.Fatalf("no VM of sandbox always on host-2")
	}
	m.killHost(host2)
	m.waitHostReady("host-2", "False")
	m.waitPhase("never", time.Minute, "Failed")
	if r := m.field("never", ".status.reason"); r != "HostLost" {
		t.Errorf("never: reason %q, want HostLost", r)
	}
	deadline := time.Now().Add(time.Minute)
	for m.field("always", ".status.hostName") == "host-2" || m.field("always", ".status.hostName") == "" {
		if time.Now().After(deadline) {
			t.Fatalf("always still on %q a minute after host-2 was lost", m.field("always", ".status.hostName"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	m.waitPhase("always", 3*time.Minute, "Running")
	newHost := m.field("always", ".status.hostName")
	if len(vmm.Pids(staleDir)) == 0 {
		t.Fatalf("the VM on the dead host is gone before it returned: the test did not test the return")
	}
	m.reviveHost(host2)
	m.waitHostReady("host-2", "True")
	deadline = time.Now().Add(time.Minute)
	for len(vmm.Pids(staleDir)) > 0 || len(vmm.Pids(filepath.Join(host2.dataDir, "node", "sandboxes", m.field("never", ".metadata.uid")))) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("host-2 still runs its stale copies a minute after it returned")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := m.field("always", ".status.hostName"); got != newHost || m.field("always", ".status.phase") != "Running" {
		t.Errorf("always is %s on %s after host-2 returned, want Running on %s", m.field("always", ".status.phase"), got, newHost)
	}

	t.Log("drain moves the sandbox and cordons the host")
	r := m.hearth("", "host", "drain", newHost, "--timeout", "2m")
	if r.code != 0 || !strings.Contains(r.stdout, "drained") {
		t.Fatalf("drain: %d %q %q", r.code, r.stdout, r.stderr)
	}
	if got := m.hostOf("always"); got == newHost {
		t.Errorf("always still on %s after drain", got)
	}
	m.waitPhase("always", 3*time.Minute, "Running")
	if u, _ := m.kubectl("get", "host", newHost, "-o", "jsonpath={.spec.unschedulable}"); u != "true" {
		t.Errorf("drained host not cordoned: %q", u)
	}
	if reason := m.field("always", ".status.conditions[?(@.type==\"Scheduled\")].reason"); reason != "Scheduled" {
		t.Errorf("always's Scheduled condition after drain: %q", reason)
	}
	if r := m.hearth("", "host", "drain", "no-such-host"); r.code == 0 || !strings.Contains(r.stderr, `host "no-such-host" not found`) {
		t.Errorf("drain of an unknown host: %d %q", r.code, r.stderr)
	}
}
