package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// hostileAgent builds hearth-agent with the hostile build tag: a guest
// that breaks the protocol on request (internal/guest/agent/hostile.go).
func hostileAgent(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "hearth-agent-hostile")
	if err := testenv.GoBuild(out, "./cmd/hearth-agent", "-tags", "hostile"); err != nil {
		t.Fatal(err)
	}
	return out
}

// procCount is how many entries /proc/PID/SUB has (fds, tasks).
func procCount(t *testing.T, pid int, sub string) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/%s", pid, sub))
	if err != nil {
		t.Fatalf("hearthd (pid %d): %v", pid, err)
	}
	return len(entries)
}

// rssMiB is the resident memory of process pid.
func rssMiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kib int
			fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), &kib)
			return kib >> 10
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}

// TestHostileGuest: guests that break the protocol in every way the
// hostile agent knows, as sandboxes and in exec sessions, beside a
// well-behaved sandbox on the same host. Each hostile sandbox ends (with
// GuestProtocolError where the protocol was broken), its shim and VM go,
// hearthd (the whole control plane here) runs on without leaking, and
// the well-behaved sandbox runs throughout (and streams 64 MiB of an
// exec's output).
func TestHostileGuest(t *testing.T) {
	h := newHarness(t)
	agent := hostileAgent(t)
	for i, e := range h.env {
		if strings.HasPrefix(e, "HEARTH_AGENT=") {
			h.env[i] = "HEARTH_AGENT=" + agent
		}
	}
	img := tools(t)
	c := startCluster(t, h)
	pid := c.cmd.Process.Pid
	c.mustKubectlIn(sandboxYAML("good", img, "", "", "sleep", "100000"), "apply", "-f", "-")
	c.waitPhase("good", 3*time.Minute, "Running")
	// A first exec, so that hearthd's exec path has made what it keeps.
	if r := c.hearth("", "exec", "good", "--", "true"); r.code != 0 {
		t.Fatalf("exec into the good sandbox: exit %d, %s", r.code, r.stderr)
	}
	fds, tasks, rss := procCount(t, pid, "fd"), procCount(t, pid, "task"), rssMiB(t, pid)
	// The good sandbox's shim, which owns its VM's channel and serves its
	// execs (the flood below goes through it).
	b, err := os.ReadFile(filepath.Join(c.dataDir, "node", "sandboxes", c.field("good", ".metadata.uid"), "run-0", "pid"))
	if err != nil {
		t.Fatal(err)
	}
	shimPid, _ := strconv.Atoi(string(b))
	shimFds, shimTasks, shimRSS := procCount(t, shimPid, "fd"), procCount(t, shimPid, "task"), rssMiB(t, shimPid)

	// As sandboxes: each its own VM, all at once.
	cases := []struct{ scenario, phase, reason string }{
		{"negative-ack", "Failed", "GuestProtocolError"},
		{"huge-ack", "Failed", "GuestProtocolError"},
		{"over-limit", "Failed", "GuestProtocolError"},
		{"false-exit", "Failed", "GuestProtocolError"},
		{"unknown-type", "Failed", "GuestProtocolError"},
		{"wrong-direction", "Failed", "GuestProtocolError"},
		{"unopened-session", "Failed", "GuestProtocolError"},
		{"past-window", "Failed", "GuestProtocolError"},
		{"half-frame", "Failed", ""}, // cut, then the guest powers off: any failure
		{"at-limit", "Succeeded", "Completed"},
		{"flood", "Succeeded", "Completed"},
		{"long-message", "Failed", "StartError"},
	}
	var manifest []string
	for _, tc := range cases {
		manifest = append(manifest, sandboxYAML(tc.scenario, img, "", "", "hostile:"+tc.scenario))
	}
	c.mustKubectlIn(strings.Join(manifest, "---\n"), "apply", "-f", "-")
	for _, tc := range cases {
		phase := c.waitPhase(tc.scenario, 3*time.Minute, "Succeeded", "Failed")
		reason, msg := c.field(tc.scenario, ".status.reason"), c.field(tc.scenario, ".status.message")
		t.Logf("%s: %s, %s: %.160s", tc.scenario, phase, reason, msg)
		if phase != tc.phase || (tc.reason != "" && reason != tc.reason) {
			t.Errorf("%s: %s (%s: %.200s), want %s (%s)", tc.scenario, phase, reason, msg, tc.phase, tc.reason)
		}
		if len(msg) > 1100 || !utf8.ValidString(msg) {
			t.Errorf("%s: a status message of %d bytes (valid UTF-8: %v)", tc.scenario, len(msg), utf8.ValidString(msg))
		}
		uid := c.field(tc.scenario, ".metadata.uid")
		dir := filepath.Join(c.dataDir, "node", "sandboxes", uid)
		waitFor(t, tc.scenario+"'s shim and VM to end", time.Minute, func() bool { return len(vmm.Pids(dir)) == 0 })
		if tc.scenario == "flood" {
			// 64 MiB of output: the log keeps its rotation's bound.
			logs, _ := filepath.Glob(filepath.Join(dir, "*.log*"))
			var n int64
			for _, l := range logs {
				if fi, err := os.Stat(l); err == nil {
					n += fi.Size()
				}
			}
			if n == 0 || n > 2*(10<<20)+(1<<20) {
				t.Errorf("flood: %d bytes of logs on the host, want at most two rotations of 10 MiB", n)
			}
		}
	}

	// In exec sessions, through the shim that owns the VM's channel: the
	// session fails, and so does its sandbox (the guest is the same
	// attacker).
	execCases := []string{"negative-ack", "over-limit", "false-exit", "wrong-direction", "unopened-session", "past-window"}
	manifest = nil
	for _, scenario := range execCases {
		manifest = append(manifest, sandboxYAML("exec-"+scenario, img, "", "", "sleep", "100000"))
	}
	c.mustKubectlIn(strings.Join(manifest, "---\n"), "apply", "-f", "-")
	for _, scenario := range execCases {
		name := "exec-" + scenario
		c.waitPhase(name, 3*time.Minute, "Running")
		r := c.hearth("", "exec", name, "--", "hostile:"+scenario)
		t.Logf("exec %s: exit %d, %.160s", scenario, r.code, strings.TrimSpace(r.stderr))
		if r.code == 0 || !strings.Contains(r.stderr, "broke the protocol") {
			t.Errorf("exec %s: exit %d, %s", scenario, r.code, r.stderr)
		}
		phase := c.waitPhase(name, time.Minute, "Failed", "Succeeded")
		if reason := c.field(name, ".status.reason"); phase != "Failed" || reason != "GuestProtocolError" {
			t.Errorf("%s after a hostile exec session: %s (%s), want Failed (GuestProtocolError)", name, phase, reason)
		}
		dir := filepath.Join(c.dataDir, "node", "sandboxes", c.field(name, ".metadata.uid"))
		waitFor(t, name+"'s shim and VM to end", time.Minute, func() bool { return len(vmm.Pids(dir)) == 0 })
	}
	r := c.hearth("", "exec", "good", "--", "hostile:flood")
	chunk := protocol.ChunkSize / 6 * 6 // "flood\n" repeated, as hostile.go sends it
	if r.code != 0 || len(r.stdout) != (64<<20)/chunk*chunk {
		t.Errorf("exec flood: exit %d, %d bytes of output, %s", r.code, len(r.stdout), r.stderr)
	}

	// The host is unharmed: hearthd is the same process, with what it had;
	// the good sandbox runs on.
	if !c.running() || c.cmd.Process.Pid != pid {
		t.Fatalf("hearthd did not survive:\n%s", c.log())
	}
	waitFor(t, "hearthd's file descriptors and threads to settle", 30*time.Second, func() bool {
		return procCount(t, pid, "fd") <= fds+4 && procCount(t, pid, "task") <= tasks+8
	})
	if p := c.field("good", ".status.phase"); p != "Running" {
		t.Errorf("the good sandbox is %s", p)
	}
	if r := c.hearth("", "exec", "good", "--", "echo", "ok"); r.code != 0 || r.stdout != "ok\n" {
		t.Errorf("exec into the good sandbox afterwards: exit %d, %q %s", r.code, r.stdout, r.stderr)
	}
	if n := c.field("good", ".status.restartCount"); n != "" && n != "0" {
		t.Errorf("the good sandbox restarted %s times", n)
	}
	// Its heap may grow with what it did (64 MiB streamed), not with it.
	if after := rssMiB(t, pid); after > rss+128 {
		t.Errorf("hearthd's resident memory grew from %d to %d MiB", rss, after)
	}
	t.Logf("hearthd: %d fds, %d threads, %d MiB resident before; %d, %d and %d MiB after", fds, tasks, rss,
		procCount(t, pid, "fd"), procCount(t, pid, "task"), rssMiB(t, pid))
	// The good sandbox's shim likewise: a window per session, whatever the
	// guest streams.
	waitFor(t, "the good shim's file descriptors and threads to settle", 30*time.Second, func() bool {
		return procCount(t, shimPid, "fd") <= shimFds+2 && procCount(t, shimPid, "task") <= shimTasks+4
	})
	if after := rssMiB(t, shimPid); after > shimRSS+32 {
		t.Errorf("the good sandbox's shim's resident memory grew from %d to %d MiB", shimRSS, after)
	}
	t.Logf("the good shim: %d fds, %d threads, %d MiB resident before; %d, %d and %d MiB after", shimFds, shimTasks, shimRSS,
		procCount(t, shimPid, "fd"), procCount(t, shimPid, "task"), rssMiB(t, shimPid))
}
