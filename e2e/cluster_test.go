package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// cluster is an all-in-one hearth (`hearth up`) started by a test, with
// its data directory, ports and run directory of its own, and real kubectl
// to talk to it.
type cluster struct {
	t          *testing.T
	h          *harness
	dataDir    string
	kubeconfig string
	args       []string

	mu   sync.Mutex
	cmd  *exec.Cmd
	logs bytes.Buffer
	done chan struct{}
}

func freePort(t *testing.T) string {
	_, port, _ := net.SplitHostPort(testenv.FreeAddr(t))
	return port
}

// startCluster starts `hearth up` with the given extra flags and waits
// until it serves. The cluster is stopped, and checked for leftovers, when
// the test ends.
func startCluster(t *testing.T, h *harness, extra ...string) *cluster {
	t.Helper()
	if _, err := exec.LookPath("kubectl"); err != nil {
		testenv.Need(t, false, "kubectl is not installed")
	}
	// Short: the sandboxes' unix sockets live under it (108-byte limit).
	dir, err := os.MkdirTemp("", "hd")
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, h: h, dataDir: dir, kubeconfig: filepath.Join(dir, "kubeconfig")}
	c.args = append([]string{"up", "--data-dir", dir, "--log-level", "info",
		"--port", freePort(t), "--etcd-client-port", freePort(t), "--etcd-peer-port", freePort(t),
		"--node-listen", testenv.FreeAddr(t), "--node-name", "host-1",
		// This machine's own network namespace is not the tests' to
		// change: the networking tests give each host a namespace
		// (multihost_test.go).
		"--network=false",
		// The tests' registries are on 127.0.0.1 (testenv.StartRegistry);
		// sandboxes pull from no other loopback address.
		"--private-registry", "127.0.0.1",
		"--ingress-http", testenv.FreeAddr(t), "--ingress-https", testenv.FreeAddr(t)}, extra...)
	t.Cleanup(func() {
		if c.running() {
			// Delete what the test left, through the API, so that the
			// node agent stops the VMs; then stop hearth.
			if out, err := c.kubectl("delete", "sandboxes", "--all", "--all-namespaces", "--timeout=2m"); err != nil {
				t.Errorf("delete sandboxes: %v\n%s", err, out)
			}
			c.stop(syscall.SIGTERM)
		}
		if t.Failed() {
			t.Logf("hearth up's log:\n%s", c.log())
		}
		c.checkNoLeaks()
		os.RemoveAll(dir)
	})
	c.start()
	return c
}

func (c *cluster) start() {
	c.t.Helper()
	cmd := c.h.command(context.Background(), c.args...)
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	c.mu.Lock()
	cmd.Stderr = &lockedWriter{mu: &c.mu, w: &c.logs}
	c.mu.Unlock()
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	done := make(chan struct{})
	c.mu.Lock()
	c.cmd, c.done = cmd, done
	c.mu.Unlock()
	up := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		once := sync.Once{}
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "hearth is up") {
				once.Do(func() { close(up) })
			}
		}
	}()
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(done)
	}()
	select {
	case <-up:
	case <-done:
		c.t.Fatalf("hearth up exited: %s", c.log())
	case <-time.After(2 * time.Minute):
		c.t.Fatalf("hearth up did not come up in 2 minutes: %s", c.log())
	}
}

func (c *cluster) running() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		return false
	}
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// stop signals hearth and waits for it to exit.
func (c *cluster) stop(sig syscall.Signal) {
	c.t.Helper()
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		<-done
		c.t.Errorf("hearth did not stop within a minute of %v", sig)
	}
}

func (c *cluster) log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logs.String()
}

// kubectl runs kubectl against the cluster.
func (c *cluster) kubectl(args ...string) (string, error) {
	return c.kubectlIn("", args...)
}

func (c *cluster) kubectlIn(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// mustKubectl runs kubectl and fails the test on error.
func (c *cluster) mustKubectl(args ...string) string {
	c.t.Helper()
	out, err := c.kubectl(args...)
	if err != nil {
		c.t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// hearth runs the hearth CLI against the cluster.
func (c *cluster) hearth(stdin string, args ...string) result {
	c.t.Helper()
	h := *c.h
	h.env = append(append([]string(nil), c.h.env...), "KUBECONFIG="+c.kubeconfig)
	return h.run(stdin, args...)
}

// field reads one field of a sandbox with a JSONPath.
func (c *cluster) field(name, path string) string {
	out, _ := c.kubectl("get", "sandbox", name, "-o", "jsonpath={"+path+"}")
	return out
}

// waitPhase waits until the sandbox reaches one of phases.
func (c *cluster) waitPhase(name string, timeout time.Duration, phases ...string) string {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		p := c.field(name, ".status.phase")
		for _, want := range phases {
			if p == want {
				return p
			}
		}
		if time.Now().After(deadline) {
			out, _ := c.kubectl("get", "sandbox", name, "-o", "yaml")
			c.t.Fatalf("sandbox %s is %q after %s, want %v:\n%s", name, p, timeout, phases, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// vmPids lists the QEMU processes of the cluster's VMs.
func (c *cluster) vmPids() []int {
	var pids []int
	for _, pid := range vmm.Pids(filepath.Join(c.dataDir, "node", "vms")) {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil && strings.HasPrefix(string(b), "qemu") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// checkNoLeaks fails the test if a VM, a shim, a run directory or a
// sandbox directory outlived the cluster.
func (c *cluster) checkNoLeaks() {
	c.t.Helper()
	testenv.CheckNoLeaks(c.t, c.h.runRoot)
	for _, pid := range vmm.Pids(c.dataDir) {
		c.t.Errorf("process %d (a shim or a VMM) outlived the cluster", pid)
	}
	for _, d := range []string{"sandboxes", "vms"} {
		if entries, _ := os.ReadDir(filepath.Join(c.dataDir, "node", d)); len(entries) > 0 {
			c.t.Errorf("%d directories left in the host's %s", len(entries), d)
		}
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
