package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// counterCmd writes a file to the writable layer, then counts in the
// shell's memory, publishing each value to /tmp/c (renamed into place, so
// that a reader never sees it empty).
var counterCmd = []string{"sh", "-c", `echo saved > /root/f; i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/c; sleep 0.2; done`}

// execOut runs a command in a sandbox through the API and returns its
// trimmed output, failing the test if it does not exit 0.
func (c *cluster) execOut(name string, cmd ...string) string {
	c.t.Helper()
	r := c.hearth("", append([]string{"exec", name, "--"}, cmd...)...)
	if r.code != 0 {
		c.t.Fatalf("hearth exec %s %v: exit %d: %s %s", name, cmd, r.code, r.stdout, r.stderr)
	}
	return strings.TrimSpace(r.stdout)
}

func (c *cluster) counter(name string) int {
	c.t.Helper()
	n, err := strconv.Atoi(c.execOut(name, "cat", "/tmp/c"))
	if err != nil {
		c.t.Fatalf("counter of %s: %v", name, err)
	}
	return n
}

// snapshotDir is the host's store directory of a Snapshot.
func (c *cluster) snapshotDir(name string) string {
	uid, err := c.kubectl("get", "snapshot", name, "-o", "jsonpath={.metadata.uid}")
	if err != nil || uid == "" {
		c.t.Fatalf("snapshot %s: %v %s", name, err, uid)
	}
	return filepath.Join(c.dataDir, "node", "snapshots", uid)
}

func TestSnapshotsThroughTheAPI(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	c := startCluster(t, h, "--node-cpu", "32")

	if out, err := c.kubectlIn(sandboxYAML("counter", img, "", "", counterCmd...), "apply", "-f", "-"); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
	c.waitPhase("counter", 3*time.Minute, "Running")
	deadline := time.Now().Add(time.Minute)
	for c.hearth("", "exec", "counter", "--", "cat", "/tmp/c").code != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the counter never counted")
		}
		time.Sleep(200 * time.Millisecond)
	}

	before := c.counter("counter")
	r := c.hearth("", "snapshot", "create", "--name", "full", "counter")
	if r.code != 0 {
		t.Fatalf("hearth snapshot create: exit %d: %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "saved counter on host host-1") {
		t.Errorf("snapshot create said %q", r.stderr)
	}
	if r := c.hearth("", "snapshot", "create", "--disk-only", "--name", "disk", "counter"); r.code != 0 {
		t.Fatalf("hearth snapshot create --disk-only: exit %d: %s", r.code, r.stderr)
	}
	ls := c.hearth("", "snapshot", "ls")
	if !hasRow(ls.stdout, "full", "counter", "memory+disk", "Ready", "host-1") || !hasRow(ls.stdout, "disk", "counter", "disk", "Ready", "host-1") {
		t.Errorf("hearth snapshot ls:\n%s%s", ls.stdout, ls.stderr)
	}
	if size, _ := c.kubectl("get", "snapshot", "full", "-o", "jsonpath={.status.sizeBytes}"); size == "" || size == "0" {
		t.Errorf("snapshot full has size %q", size)
	}
	waitFor(t, "host-1 to report its snapshots", time.Minute, func() bool {
		out, _ := c.kubectl("get", "host", "host-1", "-o", "jsonpath={.status.snapshots}")
		return strings.Contains(out, "default/full") && strings.Contains(out, "default/disk")
	})
	// The original counts on.
	if after := c.counter("counter"); after <= before {
		t.Errorf("the original's counter went from %d to %d across the snapshot", before, after)
	}

	t.Run("forks run on from the snapshot", func(t *testing.T) {
		for _, name := range []string{"fork-1", "fork-2"} {
			if r := c.hearth("", "run", "-d", "--snapshot", "full", "--name", name); r.code != 0 {
				t.Fatalf("hearth run --snapshot: exit %d: %s", r.code, r.stderr)
			}
		}
		var random []string
		for _, name := range []string{"fork-1", "fork-2"} {
			c.waitPhase(name, 2*time.Minute, "Running")
			if n := c.counter(name); n < before {
				t.Errorf("%s's counter is %d, below the %d it had before the snapshot", name, n, before)
			}
			if got := c.execOut(name, "hostname"); got != name {
				t.Errorf("%s's hostname is %q", name, got)
			}
			if got := c.execOut(name, "cat", "/root/f"); got != "saved" {
				t.Errorf("%s's /root/f is %q", name, got)
			}
			random = append(random, c.execOut(name, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"))
		}
		if random[0] == random[1] {
			t.Errorf("two forks read the same random bytes: %s", random[0])
		}
		c.execOut("fork-1", "touch", "/root/only-in-fork-1")
		if r := c.hearth("", "exec", "fork-2", "--", "test", "-e", "/root/only-in-fork-1"); r.code != 1 {
			t.Errorf("fork-2 sees fork-1's file (exit %d)", r.code)
		}
		if r := c.hearth("", "run", "--snapshot", "full", "--", "sh", "-c", "cat /root/f; test -e /tmp/c"); r.code != 0 || r.stdout != "saved\n" {
			t.Errorf("hearth run --snapshot full -- cat: exit %d, %q %s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("a disk-only snapshot boots with its files", func(t *testing.T) {
		r := c.hearth("", "run", "--snapshot", "disk", "--", "sh", "-c", "cat /root/f; touch /root/mine")
		if r.code != 0 || r.stdout != "saved\n" {
			t.Errorf("hearth run --snapshot disk: exit %d, %q %s", r.code, r.stdout, r.stderr)
		}
		// Each sandbox gets a copy: the first one's write is its own.
		if r := c.hearth("", "run", "--snapshot", "disk", "--", "test", "-e", "/root/mine"); r.code != 1 {
			t.Errorf("a second sandbox from the disk snapshot sees the first one's file (exit %d: %s)", r.code, r.stderr)
		}
	})

	t.Run("bad snapshots are refused", func(t *testing.T) {
		for _, name := range []string{"bad-version", "bad-state"} {
			if r := c.hearth("", "snapshot", "create", "--name", name, "counter"); r.code != 0 {
				t.Fatalf("hearth snapshot create: exit %d: %s", r.code, r.stderr)
			}
		}
		vms := len(c.vmPids())
		info := filepath.Join(c.snapshotDir("bad-version"), "snapshot.json")
		b, err := os.ReadFile(info)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		m["qemu"] = "6.0.0"
		b, _ = json.Marshal(m)
		if err := os.WriteFile(info, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(filepath.Join(c.snapshotDir("bad-state"), "state"), 100); err != nil {
			t.Fatal(err)
		}
		for name, want := range map[string]string{"bad-version": "it was made by QEMU 6.0.0", "bad-state": "BadSnapshot"} {
			r := c.hearth("", "run", "--snapshot", name, "--", "true")
			if r.code != 125 || !strings.Contains(r.stderr, want) {
				t.Errorf("hearth run --snapshot %s: exit %d, stderr %q, want 125 and %q", name, r.code, r.stderr, want)
			}
		}
		if n := len(c.vmPids()); n != vms {
			t.Errorf("%d VMs after the refused restores, %d before", n, vms)
		}
	})

	t.Run("rm frees the space", func(t *testing.T) {
		dir := c.snapshotDir("full")
		if r := c.hearth("", "snapshot", "rm", "full"); r.code != 0 {
			t.Fatalf("hearth snapshot rm: exit %d: %s", r.code, r.stderr)
		}
		waitFor(t, "the snapshot's files to go", 30*time.Second, func() bool {
			_, err := os.Stat(dir)
			return os.IsNotExist(err)
		})
		if r := c.hearth("", "snapshot", "rm", "full"); r.code == 0 || !strings.Contains(r.stderr, `snapshot "full" not found`) {
			t.Errorf("second rm: exit %d, %s", r.code, r.stderr)
		}
		// Forks of it run on: their memory maps the deleted file.
		if n := c.counter("fork-1"); n < before {
			t.Errorf("fork-1's counter is %d after its snapshot was deleted", n)
		}
	})
}

// waitFor polls cond until it holds, failing the test after timeout.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
