package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/tools/clientcmd"

	"hearth.dev/hearth/internal/node"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// multiHost is one control plane and N node agents on this machine, each
// in a network namespace of its own with its own address and data
// directory, joined by a bridge in the control plane's namespace:
//
//	hdc-ID (10.213.0.1, bridge hb0) ── veth ── hdhN-ID (10.213.0.1N)
//
// The node agents join with credentials from `hearth host credentials`,
// as a host on another machine would. The test reaches the API server
// through a forwarder on loopback that dials into the control plane's
// namespace.
type multiHost struct {
	*cluster
	id    string
	cp    *proc
	hosts []*hostNode
	fwd   net.Listener
}

type hostNode struct {
	name, ns, addr, dataDir string
	args                    []string
	proc                    *proc
}

// proc is a hearth process started in a namespace, with its output kept.
type proc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs bytes.Buffer
	done chan struct{}
}

const cpAddr = "10.213.0.1"

// startMultiHost starts a control plane with cpFlags and n hosts whose
// node agents get hostFlags(i) too.
func startMultiHost(t *testing.T, h *harness, n int, cpFlags []string, hostFlags func(i int) []string) *multiHost {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Need(t, false, "network namespaces need root")
	}
	dir, err := os.MkdirTemp("", "hd")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	m := &multiHost{cluster: &cluster{t: t, h: h, dataDir: dir, kubeconfig: filepath.Join(dir, "kubeconfig")}, id: id}
	t.Cleanup(m.cleanup)

	cpNS := "hdc-" + id
	m.sh("ip", "netns", "add", cpNS)
	m.sh("ip", "-n", cpNS, "link", "set", "lo", "up")
	m.sh("ip", "-n", cpNS, "link", "add", "hb0", "type", "bridge")
	m.sh("ip", "-n", cpNS, "addr", "add", cpAddr+"/24", "dev", "hb0")
	m.sh("ip", "-n", cpNS, "link", "set", "hb0", "up")
	cpDir := filepath.Join(dir, "cp")
	m.cp = m.startProc(cpNS, append([]string{"up", "--roles", "control-plane", "--data-dir", cpDir,
		"--bind-address", "0.0.0.0", "--advertise-address", cpAddr, "--log-level", "info"}, cpFlags...)...)
	m.waitKubeconfig(cpNS, filepath.Join(cpDir, "kubeconfig"))

	for i := 1; i <= n; i++ {
		hn := &hostNode{name: fmt.Sprintf("host-%d", i), ns: fmt.Sprintf("hdh%d-%s", i, id),
			addr: fmt.Sprintf("10.213.0.%d", 10+i), dataDir: filepath.Join(dir, fmt.Sprintf("h%d", i))}
		if r := h.run("", "host", "credentials", hn.name, "--data-dir", cpDir, "--address", hn.addr, "--out", hn.dataDir); r.code != 0 {
			t.Fatalf("host credentials: %s", r.stderr)
		}
		hn.args = append([]string{"up", "--roles", "node", "--data-dir", hn.dataDir, "--node-name", hn.name,
			"--node-listen", hn.addr + ":10250", "--server", "https://" + cpAddr + ":6443", "--log-level", "info"}, hostFlags(i)...)
		m.hosts = append(m.hosts, hn)
		m.plugHost(hn)
		hn.proc = m.startProc(hn.ns, hn.args...)
	}
	for _, hn := range m.hosts {
		m.waitHostReady(hn.name, "True")
	}
	return m
}

// plugHost makes the host's namespace and its link to the bridge.
func (m *multiHost) plugHost(hn *hostNode) {
	cpNS := "hdc-" + m.id
	peer := "hp" + strings.TrimPrefix(hn.ns, "hdh") // unique in the control plane's namespace, < 16 bytes
	m.sh("ip", "netns", "add", hn.ns)
	m.sh("ip", "-n", hn.ns, "link", "set", "lo", "up")
	m.sh("ip", "-n", hn.ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", cpNS)
	m.sh("ip", "-n", hn.ns, "addr", "add", hn.addr+"/24", "dev", "eth0")
	m.sh("ip", "-n", hn.ns, "link", "set", "eth0", "up")
	m.sh("ip", "-n", cpNS, "link", "set", peer, "master", "hb0", "up")
}

// killHost SIGKILLs the host's node agent and takes its namespace and
// link down, as a host that dies; its VMs' supervisors live on, as they
// would on a host cut off from the network.
func (m *multiHost) killHost(hn *hostNode) {
	_ = hn.proc.cmd.Process.Kill()
	<-hn.proc.done
	m.sh("ip", "-n", hn.ns, "link", "del", "eth0")
	m.sh("ip", "netns", "del", hn.ns)
}

// reviveHost brings a killed host back with the same data directory.
func (m *multiHost) reviveHost(hn *hostNode) {
	m.plugHost(hn)
	hn.proc = m.startProc(hn.ns, hn.args...)
}

func (m *multiHost) sh(args ...string) {
	m.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		m.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (m *multiHost) startProc(ns string, args ...string) *proc {
	m.t.Helper()
	// nsenter, not `ip netns exec`: that also gives the process a mount
	// namespace with a fresh /sys, in which the host's cgroup mounts (and
	// so the jails' cgroups) are gone.
	cmd := exec.Command("nsenter", append([]string{"--net=/var/run/netns/" + ns, "--", m.h.bin}, args...)...)
	cmd.Env = m.h.env
	p := &proc{cmd: cmd, done: make(chan struct{})}
	w := &lockedWriter{mu: &p.mu, w: &p.logs}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p
}

func (p *proc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(time.Minute):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// waitKubeconfig waits for the control plane to serve, then writes the
// test's kubeconfig: the same, through a forwarder on loopback.
func (m *multiHost) waitKubeconfig(ns, path string) {
	m.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(m.cp.log(), "hearth is up") {
		select {
		case <-m.cp.done:
			m.t.Fatalf("the control plane exited:\n%s", m.cp.log())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("the control plane did not come up in 2 minutes:\n%s", m.cp.log())
		}
	}
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		m.t.Fatal(err)
	}
	if m.fwd, err = forward(ns, cpAddr+":6443"); err != nil {
		m.t.Fatal(err)
	}
	for _, c := range cfg.Clusters {
		c.Server = "https://" + m.fwd.Addr().String()
	}
	if err := clientcmd.WriteToFile(*cfg, m.kubeconfig); err != nil {
		m.t.Fatal(err)
	}
}

func (m *multiHost) waitHostReady(name, status string) {
	m.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, _ := m.kubectl("get", "host", name, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if out == status {
			return
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("host %s Ready is %q after 2 minutes, want %s\n%s", name, out, status, m.logs())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (m *multiHost) logs() string {
	var b strings.Builder
	fmt.Fprintf(&b, "--- control plane:\n%s", m.cp.log())
	for _, hn := range m.hosts {
		if hn.proc != nil {
			fmt.Fprintf(&b, "--- %s:\n%s", hn.name, hn.proc.log())
		}
	}
	return b.String()
}

func (m *multiHost) cleanup() {
	t := m.t
	if m.cp != nil && !isDone(m.cp) {
		if out, err := m.kubectl("delete", "sandboxes", "--all", "--all-namespaces", "--timeout=2m"); err != nil {
			t.Errorf("delete sandboxes: %v\n%s", err, out)
		}
	}
	for _, hn := range m.hosts {
		if hn.proc != nil {
			hn.proc.stop()
		}
	}
	if m.cp != nil {
		m.cp.stop()
	}
	if t.Failed() && m.cp != nil {
		t.Logf("logs:\n%s", m.logs())
	}
	for _, hn := range m.hosts {
		for _, pid := range vmm.Pids(hn.dataDir) {
			t.Errorf("process %d (a shim or a VMM) outlived host %s", pid, hn.name)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, d := range []string{"sandboxes", "vms"} {
			if entries, _ := os.ReadDir(filepath.Join(hn.dataDir, "node", d)); len(entries) > 0 {
				t.Errorf("%d directories left in host %s's %s", len(entries), hn.name, d)
			}
		}
		if out, err := exec.Command("ip", "-n", hn.ns, "-o", "link", "show").Output(); err == nil && strings.Contains(string(out), ": hs") {
			t.Errorf("sandbox taps left on host %s:\n%s", hn.name, out)
		}
		_ = exec.Command("ip", "netns", "del", hn.ns).Run()
		// The policy programs' pins outlive node agents by design.
		_ = os.RemoveAll(node.PinDir(hn.name, filepath.Join(hn.dataDir, "node", "sandboxes")))
	}
	_ = exec.Command("ip", "netns", "del", "hdc-"+m.id).Run()
	if m.fwd != nil {
		m.fwd.Close()
	}
	testenv.CheckNoLeaks(t, m.h.runRoot)
	os.RemoveAll(m.dataDir)
}

func isDone(p *proc) bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// forward listens on loopback and connects each client to addr inside
// the network namespace ns, until the listener is closed.
func forward(ns, addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := dialIn(ns, addr)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return l, nil
}

// dialIn dials addr from inside the network namespace ns: the socket is
// made by a thread switched into it, and stays there after the switch
// back.
func dialIn(ns, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is not unlocked if it could not switch back: it then
		// ends with this goroutine instead of serving others.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		target, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			ch <- result{nil, err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{nil, err}
			return
		}
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// hostOf is the host a sandbox is bound to, once it is.
func (m *multiHost) hostOf(name string) string {
	m.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if h := m.field(name, ".status.hostName"); h != "" {
			return h
		}
		if time.Now().After(deadline) {
			out, _ := m.kubectl("get", "sandbox", name, "-o", "yaml")
			m.t.Fatalf("sandbox %s not bound after a minute:\n%s", name, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
