package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// moverYAML is a sandbox on no host in particular whose shell counts, in
// memory and in a file on its writable disk (each line fsynced), and
// answers TCP on 9090.
func moverYAML(name, img string) string {
	return fmt.Sprintf(`apiVersion: hearth.dev/v1alpha1
kind: Sandbox
metadata:
  name: %s
spec:
  image: %s
  command: [sh, -c, %q]
  resources: {cpu: 500m, memory: 128Mi, disk: 64Mi}
`, name, img, "nc -ll -p 9090 -e cat & i=0; while :; do i=$((i+1)); echo $i; echo $i > /tmp/counter; echo $i >> /count.log; sync /count.log; sleep 0.2; done")
}

// TestMigration moves a running sandbox between two hosts and back
// through the API (`hearth migrate`, a Migration): it keeps counting
// where it was, in memory and on its disk, is never restarted, takes an
// address of the host it is on, reaches its peer across hosts from
// there, and its first host lets go of everything it had for it. A
// migration the control plane cannot carry out fails with its reason.
func TestMigration(t *testing.T) {
	h := newHarness(t)
	m := startMultiHost(t, h, 2, nil, func(int) []string { return nil })
	img := netImage(t)
	m.apply(moverYAML("mover", img))
	m.apply(moverYAML("peer", img))
	m.waitPhase("mover", 3*time.Minute, "Running")
	m.waitPhase("peer", 3*time.Minute, "Running")
	uid := m.field("mover", ".metadata.uid")

	counter := func(t *testing.T) int {
		t.Helper()
		out, ok := m.shIn("mover", "cat /tmp/counter")
		n, err := strconv.Atoi(out)
		if !ok || err != nil {
			t.Fatalf("the counter: %q (ok %v)", out, ok)
		}
		return n
	}
	// The file has every number once, in order, up to about the counter.
	checkFile := func(t *testing.T, least int) {
		t.Helper()
		out, ok := m.shIn("mover", `awk 'NR != $1 { print "line " NR " is " $1; exit 1 } END { print NR }' /count.log`)
		n, err := strconv.Atoi(out)
		if !ok || err != nil || n < least {
			t.Errorf("the count file: %q (ok %v), want whole and at least %d lines", out, ok, least)
		}
	}
	sandboxDir := func(host int) string {
		dirs, _ := filepath.Glob(filepath.Join(m.hosts[host].dataDir, "node", "sandboxes", uid))
		if len(dirs) == 0 {
			return ""
		}
		return dirs[0]
	}
	hostIndex := func(name string) int {
		for i, hn := range m.hosts {
			if hn.name == name {
				return i
			}
		}
		t.Fatalf("no host %q", name)
		return -1
	}

	move := func(t *testing.T, args ...string) {
		t.Helper()
		from := m.field("mover", ".status.hostName")
		ip := m.field("mover", ".status.ip")
		before := counter(t)
		r := m.hearth("", append([]string{"migrate", "mover"}, args...)...)
		if r.code != 0 {
			out, _ := m.kubectl("get", "migrations", "-o", "yaml")
			t.Fatalf("hearth migrate %v: exit %d: %s %s\n%s\n%s", args, r.code, r.stdout, r.stderr, out, m.logs())
		}
		name := strings.TrimSpace(r.stdout)
		if !strings.Contains(r.stderr, "moved mover from "+from+" to ") {
			t.Errorf("hearth migrate said: %s", r.stderr)
		}
		to := m.mustKubectl("get", "migration", name, "-o", "jsonpath={.status.targetHost}")
		if to == from || to == "" {
			t.Fatalf("migrated from %s to %q", from, to)
		}
		if got := m.mustKubectl("get", "migration", name, "-o", "jsonpath={.status.phase} {.status.sourceHost}"); got != "Succeeded "+from {
			t.Errorf("the migration's status: %q", got)
		}
		for _, f := range []string{".status.bytes", ".status.totalMillis"} {
			if n, _ := strconv.Atoi(m.mustKubectl("get", "migration", name, "-o", "jsonpath={"+f+"}")); n <= 0 {
				t.Errorf("migration %s: %s is %d", name, f, n)
			}
		}
		waitFor(t, "the sandbox bound to "+to, time.Minute, func() bool {
			return m.field("mover", ".status.hostName") == to && m.field("mover", ".status.phase") == "Running"
		})
		if n := m.field("mover", ".status.restartCount"); n != "" && n != "0" {
			t.Errorf("restartCount %s after the move: it was restarted", n)
		}
		newIP := m.field("mover", ".status.ip")
		if newIP == ip || !strings.HasPrefix(newIP, "10.244.") {
			t.Errorf("the address after the move: %q (was %s)", newIP, ip)
		}
		if out, _ := m.shIn("mover", "ip -4 addr show eth0"); !strings.Contains(out, newIP+"/32") || strings.Contains(out, ip+"/") {
			t.Errorf("eth0 after the move does not have %s alone: %s", newIP, out)
		}
		after := counter(t)
		if after < before {
			t.Errorf("the counter went back: %d before the move, %d after", before, after)
		}
		time.Sleep(time.Second)
		if again := counter(t); again <= after {
			t.Errorf("the counter stopped after the move: %d, then %d", after, again)
		}
		checkFile(t, before)
		// One log across the hosts: every number once, in order.
		logs := m.hearth("", "logs", "mover")
		lines := strings.Fields(logs.stdout)
		for i, l := range lines {
			if l != strconv.Itoa(i+1) {
				t.Errorf("hearth logs: line %d is %q (exit %d, %s)", i+1, l, logs.code, logs.stderr)
				break
			}
		}
		if len(lines) < after {
			t.Errorf("hearth logs has %d lines, the counter is at %d", len(lines), after)
		}
		peer := m.field("peer", ".status.ip")
		if out := m.expectSh("tcp to the peer after the move", "mover", "echo moved | nc -w 3 "+peer+" 9090", true); out != "moved" {
			t.Errorf("tcp echo from the moved sandbox to its peer: %q", out)
		}
		waitFor(t, from+" to let go of the sandbox", time.Minute, func() bool { return sandboxDir(hostIndex(from)) == "" })
		if sandboxDir(hostIndex(to)) == "" {
			t.Errorf("%s has no directory for the sandbox", to)
		}
	}

	first := m.field("mover", ".status.hostName")
	other := m.hosts[0].name
	if other == first {
		other = m.hosts[1].name
	}
	t.Run("to a named host", func(t *testing.T) { move(t, "--to", other) })
	t.Run("back, where the scheduler picks", func(t *testing.T) { move(t) })

	t.Run("deleted at once", func(t *testing.T) {
		// Cancelled before the switch, or too late to: either way the
		// sandbox runs on one host, is not restarted, and counts on.
		before := counter(t)
		r := m.hearth("", "migrate", "mover", "--wait=false")
		if r.code != 0 {
			t.Fatalf("hearth migrate --wait=false: %s", r.stderr)
		}
		name := strings.TrimSpace(r.stdout)
		m.mustKubectl("delete", "migration", name, "--wait=false")
		waitFor(t, "the deleted migration to be gone", 2*time.Minute, func() bool {
			_, err := m.kubectl("get", "migration", name)
			return err != nil
		})
		waitFor(t, "the sandbox running", time.Minute, func() bool { return m.field("mover", ".status.phase") == "Running" })
		on := m.field("mover", ".status.hostName")
		if n := m.field("mover", ".status.restartCount"); n != "" && n != "0" {
			t.Errorf("restartCount %s after a cancelled migration", n)
		}
		if after := counter(t); after <= before {
			t.Errorf("the counter: %d before, %d after", before, after)
		}
		checkFile(t, before)
		for i, hn := range m.hosts {
			if hn.name != on {
				waitFor(t, hn.name+" to have nothing of the sandbox", time.Minute, func() bool { return sandboxDir(i) == "" })
			}
		}
		t.Logf("deleted at once, the sandbox runs on %s (it ran on %s)", on, first)
	})

	t.Run("refused", func(t *testing.T) {
		on := m.field("peer", ".status.hostName")
		r := m.hearth("", "migrate", "peer", "--to", on)
		if r.code == 0 || !strings.Contains(r.stderr, "NoTarget") || !strings.Contains(r.stderr, "already runs on "+on) {
			t.Errorf("a migration to the host it runs on: exit %d: %s", r.code, r.stderr)
		}
		m.mustKubectlIn("apiVersion: hearth.dev/v1alpha1\nkind: Migration\nmetadata: {name: ghost}\nspec: {sandbox: nobody}\n", "apply", "-f", "-")
		waitFor(t, "the ghost migration to fail", 30*time.Second, func() bool {
			out, _ := m.kubectl("get", "migration", "ghost", "-o", "jsonpath={.status.phase} {.status.reason}")
			return out == "Failed SandboxNotFound"
		})
		if n := m.field("peer", ".status.restartCount"); n != "" && n != "0" {
			t.Errorf("the peer was restarted: %s", n)
		}
	})
	t.Run("drain", func(t *testing.T) {
		// Both sandboxes on one host, which is drained: each is migrated,
		// none restarted.
		on := m.field("mover", ".status.hostName")
		if p := m.field("peer", ".status.hostName"); p != on {
			r := m.hearth("", "migrate", "peer", "--to", on)
			if r.code != 0 {
				t.Fatalf("migrate the peer to %s: %s", on, r.stderr)
			}
			waitFor(t, "the peer bound to "+on, time.Minute, func() bool { return m.field("peer", ".status.hostName") == on })
		}
		before := counter(t)
		r := m.hearth("", "host", "drain", on, "--timeout", "3m")
		if r.code != 0 {
			t.Fatalf("hearth host drain %s: exit %d: %s %s", on, r.code, r.stdout, r.stderr)
		}
		defer m.hearth("", "host", "uncordon", on)
		for _, sb := range []string{"mover", "peer"} {
			if !strings.Contains(r.stdout, "migrating sandbox default/"+sb) || strings.Contains(r.stdout, "evicting sandbox default/"+sb) {
				t.Errorf("drain did not migrate %s:\n%s", sb, r.stdout)
			}
			waitFor(t, sb+" running elsewhere", time.Minute, func() bool {
				h := m.field(sb, ".status.hostName")
				return h != on && h != "" && m.field(sb, ".status.phase") == "Running"
			})
			if n := m.field(sb, ".status.restartCount"); n != "" && n != "0" {
				t.Errorf("%s restarted by the drain: restartCount %s", sb, n)
			}
		}
		if got := m.mustKubectl("get", "host", on, "-o", "jsonpath={.spec.unschedulable}"); got != "true" {
			t.Errorf("the drained host is not cordoned: %q", got)
		}
		if after := counter(t); after <= before {
			t.Errorf("the counter after the drain: %d, before %d", after, before)
		}
		checkFile(t, before)
	})
	if t.Failed() {
		t.Log(m.logs())
	}
}
