package e2e

import (
	"fmt"
	"maps"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/api/v1alpha1"
)

func templateYAML(name, image, readiness string, command ...string) string {
	var cmd []string
	for _, c := range command {
		cmd = append(cmd, fmt.Sprintf("%q", c))
	}
	return fmt.Sprintf(`apiVersion: hearth.dev/v1alpha1
kind: SandboxTemplate
metadata:
  name: %s
spec:
  image: %s
  command: [%s]
  resources: {cpu: 100m, memory: 128Mi, disk: 64Mi}
  readiness: %s
`, name, image, strings.Join(cmd, ", "), readiness)
}

func poolYAML(name, template string, replicas int) string {
	return fmt.Sprintf(`apiVersion: hearth.dev/v1alpha1
kind: WarmPool
metadata:
  name: %s
spec:
  template: %s
  replicas: %d
`, name, template, replicas)
}

func claimYAML(name, pool string) string {
	return fmt.Sprintf(`apiVersion: hearth.dev/v1alpha1
kind: Sandbox
metadata:
  name: %s
spec:
  source: {warmPool: %s}
  resources: {cpu: 100m, memory: 128Mi, disk: 64Mi}
`, name, pool)
}

func (c *cluster) apply(manifest string) {
	c.t.Helper()
	if out, err := c.kubectlIn(manifest, "apply", "-f", "-"); err != nil {
		c.t.Fatalf("kubectl apply: %v\n%s\n%s", err, out, manifest)
	}
}

// claimsRunning polls the sandboxes claim-0 … claim-(n-1) until each is
// Running, and then sends its warm pool member on its channel; the
// channels of those not Running within timeout are closed.
func claimsRunning(t *testing.T, c *cluster, n int, timeout time.Duration) map[string]chan string {
	chans := map[string]chan string{}
	for i := range n {
		chans[fmt.Sprintf("claim-%d", i)] = make(chan string, 1)
	}
	go func() {
		waiting := maps.Clone(chans)
		deadline := time.Now().Add(timeout)
		for len(waiting) > 0 && time.Now().Before(deadline) {
			out, err := c.kubectl("get", "sandboxes", "-o",
				`jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.warmPoolMember}{"\n"}{end}`)
			if err != nil {
				t.Logf("kubectl get sandboxes: %v: %s", err, out)
			}
			for _, line := range strings.Split(out, "\n") {
				f := strings.Fields(line)
				if len(f) == 3 && f[1] == "Running" && waiting[f[0]] != nil {
					waiting[f[0]] <- f[2]
					delete(waiting, f[0])
				}
			}
			time.Sleep(500 * time.Millisecond)
		}
		for _, ch := range waiting {
			close(ch)
		}
	}()
	return chans
}

// poolField reads a warm pool's fields with a JSONPath template.
func (c *cluster) poolField(name, template string) string {
	out, _ := c.kubectl("get", "warmpool", name, "-o", "jsonpath="+template)
	return out
}

func TestTemplatesAndWarmPools(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	c := startCluster(t, h, "--node-cpu", "64")

	// The template's process marks itself ready after a while; the
	// readiness check waits for the mark.
	c.apply(templateYAML("shell", img, "{exec: [test, -e, /ready]}", "sh", "-c", "sleep 1; touch /ready; exec sleep 100000"))

	t.Run("run --template", func(t *testing.T) {
		r := c.hearth("", "run", "--template", "shell", "--", "sh", "-c", "test -e /ready && echo ready-from-template")
		if r.code != 0 || r.stdout != "ready-from-template\n" {
			t.Fatalf("hearth run --template: exit %d, %q, %s", r.code, r.stdout, r.stderr)
		}
		if got, _ := c.kubectl("get", "sandboxtemplate", "shell", "-o", "jsonpath={.status.hosts[0].name} {.status.hosts[0].ready}"); got != "host-1 true" {
			t.Errorf("template status: %q", got)
		}
		waitFor(t, "host-1 to report the template", 30*time.Second, func() bool {
			out, _ := c.kubectl("get", "host", "host-1", "-o", "jsonpath={.status.templates}")
			return strings.Contains(out, "default/shell")
		})
	})

	t.Run("50 claims against a pool of 5", func(t *testing.T) {
		c.apply(poolYAML("pool", "shell", 5))
		waitFor(t, "5 ready in the pool", 3*time.Minute, func() bool { return c.poolField("pool", "{.status.readyReplicas}") == "5" })
		// Forks of the template: each one's disk copy is reserved whole.
		disks, _ := filepath.Glob(filepath.Join(c.dataDir, "node", "vms", "*", "disk.ext4"))
		if len(disks) < 5 {
			t.Errorf("%d disks in the VM directory for 5 pool sandboxes", len(disks))
		}
		for _, d := range disks {
			var st syscall.Stat_t
			if err := syscall.Stat(d, &st); err != nil || st.Blocks*512 < st.Size {
				t.Errorf("a pool sandbox's disk holds %d of its %d bytes (%v): not reserved", st.Blocks*512, st.Size, err)
			}
		}

		var manifest []string
		for i := range 50 {
			manifest = append(manifest, claimYAML(fmt.Sprintf("claim-%d", i), "pool"))
		}
		c.apply(strings.Join(manifest, "---\n"))
		// Each claim, once running, checks that nobody had its VM
		// before (a mark in the VM), and is deleted, as an agent's
		// sandbox is when its work is done. One poll of every claim's
		// phase serves the 50 of them: a kubectl per claim every 200 ms
		// (250 processes a second) starved the VMs of a 2-core machine.
		running := claimsRunning(t, c, 50, 5*time.Minute)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var stuck sync.Once
		members := map[string]string{}
		for i := range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("claim-%d", i)
				member, ok := <-running[name]
				if !ok {
					out, _ := c.kubectl("get", "sandbox", name, "-o", "yaml")
					t.Errorf("%s never ran:\n%s", name, out)
					// Once: why the pool did not refill (its
					// members, the pool, what the host offers).
					stuck.Do(func() {
						for _, args := range [][]string{
							{"get", "sandboxes", "-l", v1alpha1.LabelWarmPool, "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,REASON:.status.reason,MESSAGE:.status.message,HOST:.status.hostName"},
							{"get", "warmpool", "pool", "-o", "yaml"},
							{"get", "hosts", "-o", "jsonpath={.items[*].status.allocatable}"},
						} {
							out, _ := c.kubectl(args...)
							t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
						}
					})
					return
				}
				r := c.hearth("", "exec", name, "--", "sh", "-c", "test -e /claimed && exit 7; touch /claimed; test -e /ready && hostname")
				if r.code != 0 {
					t.Errorf("%s: exit %d (7: its VM was claimed before): %s %s", name, r.code, r.stdout, r.stderr)
				}
				if got := strings.TrimSpace(r.stdout); r.code == 0 && got != member {
					t.Errorf("%s runs in VM %q, but took over %q", name, got, member)
				}
				mu.Lock()
				if other, ok := members[member]; ok || member == "" {
					t.Errorf("%s and %s both took over %q", name, other, member)
				}
				members[member] = name
				mu.Unlock()
				c.hearth("", "rm", name)
			}()
		}
		wg.Wait()
		if len(members) != 50 {
			t.Errorf("%d distinct pool sandboxes served 50 claims", len(members))
		}
		waitFor(t, "the pool back to 5 ready", 3*time.Minute, func() bool {
			return c.poolField("pool", "{.status.readyReplicas} {.status.replicas}") == "5 5" &&
				strings.Trim(c.poolField("pool", "{.status.waiting}"), "0") == ""
		})
	})

	t.Run("kubectl scale", func(t *testing.T) {
		if out, err := c.kubectl("scale", "warmpool/pool", "--replicas", "2"); err != nil {
			t.Fatalf("kubectl scale: %v\n%s", err, out)
		}
		waitFor(t, "the pool down to 2", 2*time.Minute, func() bool {
			out, _ := c.kubectl("get", "sandboxes", "-l", "hearth.dev/warm-pool=pool", "-o", "name")
			return c.poolField("pool", "{.status.replicas}") == "2" && len(strings.Fields(out)) == 2
		})
		if out := c.mustKubectl("get", "warmpool", "pool"); !hasRow(out, "pool", "shell", "2", "2") {
			t.Errorf("kubectl get warmpool:\n%s", out)
		}
	})

	t.Run("a template that cannot start", func(t *testing.T) {
		c.apply(templateYAML("broken", img, "{tcpPort: 8080, timeoutSeconds: 2}", "sh", "-c", "echo no server here; exit 3"))
		c.apply(poolYAML("broken-pool", "broken", 2))
		waitFor(t, "the pool to report its template's failure", 2*time.Minute, func() bool {
			return c.poolField("broken-pool", `{.status.conditions[?(@.type=="Ready")].reason}`) == "TemplateError"
		})
		msg := c.poolField("broken-pool", `{.status.conditions[?(@.type=="Ready")].message}`)
		if !strings.Contains(msg, "exited with code 3") || !strings.Contains(msg, "no server here") {
			t.Errorf("the pool's condition says %q", msg)
		}
		// Not a tight loop: one more try in the next few seconds at most.
		failures := func() int {
			out, _ := c.kubectl("get", "sandboxtemplate", "broken", "-o", "jsonpath={.status.hosts[0].failures}")
			n, _ := strconv.Atoi(out)
			return n
		}
		first := failures()
		time.Sleep(8 * time.Second)
		if n := failures(); n > first+1 || n > 2 {
			t.Errorf("the broken template was tried %d times in 8 s (after %d)", n, first)
		}
		out, _ := c.kubectl("get", "sandboxes", "-l", "hearth.dev/warm-pool=broken-pool", "-o", "name")
		if n := len(strings.Fields(out)); n != 2 {
			t.Errorf("the broken pool has %d sandboxes, want its 2 waiting", n)
		}
		c.mustKubectl("delete", "warmpool", "broken-pool", "pool")
		waitFor(t, "the pools' sandboxes to go", time.Minute, func() bool {
			out, _ := c.kubectl("get", "sandboxes", "-o", "name")
			return strings.TrimSpace(out) == ""
		})
	})
}
