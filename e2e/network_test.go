package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/network/nettest"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/testenv"
)

// netImage is busybox plus nettool (e2e/testdata/nettool).
func netImage(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nettool")
	if err := testenv.GoBuild(bin, "./e2e/testdata/nettool"); err != nil {
		t.Fatal(err)
	}
	body, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	img := testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}, []imagebuild.File{{Path: "bin/nettool", Mode: 0o755, Body: body}})
	return testenv.OCILayout(t, img, "net")
}

// netSandbox is a sandbox on a given host running a shell command.
func netSandbox(name, img, host, labels, script string) string {
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
  command: [sh, -c, %q]
  resources: {cpu: 500m, memory: 128Mi, disk: 64Mi}
  hostSelector: {hearth.dev/hostname: %s}
  ports: [{name: http, port: 8080, public: true}, {port: 8081, public: true}, {port: 9999, public: true}]
---
`, name, labels, img, script, host)
}

// sh runs a shell command in a sandbox; it returns the output and whether
// it exited 0.
// A name "NAMESPACE/NAME" is a sandbox of another namespace than default.
func (m *multiHost) shIn(name, script string) (string, bool) {
	m.t.Helper()
	ns := "default"
	if i := strings.IndexByte(name, '/'); i >= 0 {
		ns, name = name[:i], name[i+1:]
	}
	r := m.hearth("", "--namespace", ns, "exec", name, "--", "sh", "-c", script)
	return strings.TrimSpace(r.stdout + r.stderr), r.code == 0
}

// expectSh fails the test unless the command's success is want.
func (m *multiHost) expectSh(what, name, script string, want bool) string {
	m.t.Helper()
	out, ok := m.shIn(name, script)
	if ok != want {
		m.t.Errorf("%s: %q in %s exited ok=%v, want %v: %s", what, script, name, ok, want, out)
	}
	return out
}

// TestNetworking runs sandboxes on two hosts (network namespaces joined
// by a bridge): addresses, cross-host TCP, UDP and ICMP, DNS, what a
// sandbox may never reach, NetworkPolicies, and the ingress.
func TestNetworking(t *testing.T) {
	h := newHarness(t)
	ingressFlags := []string{"--roles", "control-plane,ingress", "--ingress-http", cpAddr + ":8480",
		"--ingress-https", cpAddr + ":8443", "--ingress-domain", "hearth.test"}
	m := startMultiHost(t, h, 2, ingressFlags, func(int) []string { return nil })
	img := netImage(t)

	serve := "nettool http :8080 hello-from-b & nettool udp-echo :5353 & nettool ws-echo :8081 & nettool slow :8082 & nc -ll -p 9090 -e cat & wait"
	m.apply(netSandbox("a", img, "host-1", "{app: a}", "nc -ll -p 7070 -e cat & sleep 3600"),
		netSandbox("b", img, "host-2", "{app: b}", serve))
	m.waitPhase("a", 3*time.Minute, "Running")
	m.waitPhase("b", 3*time.Minute, "Running")
	ipA, ipB := m.field("a", ".status.ip"), m.field("b", ".status.ip")
	if !strings.HasPrefix(ipA, "10.244.") || !strings.HasPrefix(ipB, "10.244.") || ipA[:9] == ipB[:9] {
		t.Fatalf("addresses a=%q b=%q: want each from its host's 10.244.x.0/24", ipA, ipB)
	}
	if out, _ := m.shIn("a", "ip -4 addr show eth0"); !strings.Contains(out, ipA+"/32") {
		t.Errorf("a's eth0 does not have its address %s: %s", ipA, out)
	}

	t.Log("across hosts: TCP, UDP, ICMP, DNS")
	if out := m.expectSh("tcp", "a", "echo hi | nc -w 3 "+ipB+" 9090", true); out != "hi" {
		t.Errorf("tcp echo from a to b: %q", out)
	}
	if out := m.expectSh("udp", "a", "nettool udp "+ipB+":5353 ping-udp", true); out != "ping-udp" {
		t.Errorf("udp echo from a to b: %q", out)
	}
	if out := m.expectSh("http", "a", "timeout 5 wget -O- http://"+ipB+":8080/x 2>&1", true); !strings.Contains(out, "hello-from-b /x") {
		t.Errorf("http from a to b: %q", out)
	}
	// (busybox wget -T crashes: timeout(1) bounds it instead.)
	m.expectSh("icmp", "a", "ping -c 1 -W 3 "+ipB, true)
	if out := m.expectSh("dns", "a", "nslookup b.default.hearth", true); !strings.Contains(out, ipB) {
		t.Errorf("nslookup b.default.hearth: %s", out)
	}
	if out := m.expectSh("resolv.conf", "a", "cat /etc/resolv.conf", true); !strings.Contains(out, "nameserver 10.244.") {
		t.Errorf("resolv.conf: %s", out)
	}

	t.Log("NAT: the outside sees the host's address; without NAT nothing gets out")
	testNAT(t, m, img, ipA)

	t.Log("never reached: the API server, a host's management address, metadata")
	// The test can tell: from the host itself, the API port answers.
	if out, err := exec.Command("ip", "netns", "exec", m.hosts[0].ns, "busybox", "nc", "-w", "2", cpAddr, "6443").CombinedOutput(); err != nil {
		t.Fatalf("the API server is not reachable from host-1 itself: %v %s", err, out)
	}
	forbidden := func(when string) {
		for _, dst := range []string{cpAddr + " 6443", m.hosts[1].addr + " 10250", m.hosts[0].addr + " 10250", "169.254.169.254 80"} {
			m.expectSh(when+": "+dst, "a", "nc -w 2 "+dst+" </dev/null", false)
		}
	}
	forbidden("without policies")

	testNamespaces(t, m, img, ipA, ipB)

	t.Log("policies")
	m.mustKubectlIn(`apiVersion: hearth.dev/v1alpha1
kind: NetworkPolicy
metadata: {name: b-in}
spec:
  sandboxSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{sandboxSelector: {matchLabels: {app: a}}}]
    ports: [{port: http}]
`, "apply", "-f", "-")
	waitFor(t, "the policy to reach host-2", 30*time.Second, func() bool {
		_, ok := m.shIn("a", "echo x | nc -w 2 "+ipB+" 9090")
		return !ok
	})
	if out := m.expectSh("a→b:8080 allowed", "a", "timeout 5 wget -O- http://"+ipB+":8080/x 2>&1", true); !strings.Contains(out, "hello-from-b /x") {
		t.Errorf("a→b:8080 under the policy: %q", out)
	}
	m.expectSh("a→b udp not allowed", "a", "nettool udp "+ipB+":5353 nope", false)
	m.expectSh("b→a (b's egress is not isolated)", "b", "echo back | nc -w 3 "+ipA+" 7070", true)
	m.mustKubectlIn(`apiVersion: hearth.dev/v1alpha1
kind: NetworkPolicy
metadata: {name: a-out}
spec:
  sandboxSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [`+ipB+`/32]}}]
`, "apply", "-f", "-")
	waitFor(t, "a's egress policy", 30*time.Second, func() bool {
		_, ok := m.shIn("a", "timeout 3 wget -qO- http://"+ipB+":8080/")
		return !ok
	})
	m.expectSh("dns under an egress policy", "a", "nslookup b.default.hearth", true)
	forbidden("with policies")
	m.mustKubectl("delete", "networkpolicy", "a-out", "b-in")
	waitFor(t, "traffic after the policies are removed", 30*time.Second, func() bool {
		_, ok := m.shIn("a", "echo x | nc -w 2 "+ipB+" 9090")
		return ok
	})

	t.Log("a fork of a snapshot gets an address of its own")
	if r := m.hearth("", "snapshot", "create", "--name", "snap-a", "a"); r.code != 0 {
		t.Fatalf("snapshot create: %s %s", r.stdout, r.stderr)
	}
	if r := m.hearth("", "run", "-d", "--snapshot", "snap-a", "--name", "a2"); r.code != 0 {
		t.Fatalf("run --snapshot: %s %s", r.stdout, r.stderr)
	}
	m.waitPhase("a2", 2*time.Minute, "Running")
	ipA2 := m.field("a2", ".status.ip")
	if ipA2 == "" || ipA2 == ipA {
		t.Errorf("the fork's address %q (a's is %s)", ipA2, ipA)
	}
	if out, _ := m.shIn("a2", "ip -4 addr show eth0"); !strings.Contains(out, ipA2+"/32") || strings.Contains(out, ipA+"/") {
		t.Errorf("the fork's eth0 does not have its own address %s alone: %s", ipA2, out)
	}
	if out := m.expectSh("tcp from the fork", "a2", "echo fork | nc -w 3 "+ipB+" 9090", true); out != "fork" {
		t.Errorf("tcp echo from the fork to b: %q", out)
	}
	m.expectSh("the original still reaches b", "a", "echo x | nc -w 3 "+ipB+" 9090", true)

	t.Log("a restarted node agent never leases an address twice")
	h1 := m.hosts[0]
	_ = h1.proc.cmd.Process.Kill()
	<-h1.proc.done
	h1.proc = m.startProc(h1.ns, h1.args...)
	m.apply(netSandbox("c", img, "host-1", "", "sleep 3600"))
	m.waitPhase("c", 3*time.Minute, "Running")
	if ipC := m.field("c", ".status.ip"); ipC == "" || ipC == ipA || ipC == ipA2 {
		t.Errorf("after a restart c got %q (a has %s, a2 %s)", ipC, ipA, ipA2)
	}
	m.expectSh("a after its agent restarted", "a", "echo x | nc -w 3 "+ipB+" 9090", true)
	m.mustKubectl("delete", "sandbox", "c", "a2")

	t.Log("ingress")
	testIngress(t, m, ipB)
}

// testNamespaces: sandboxes of different namespaces do not reach each
// other, or each other's names, unless a policy of the receiver's
// namespace allows it; no sandbox reaches another host's gateway.
func testNamespaces(t *testing.T, m *multiHost, img, ipA, ipB string) {
	t.Log("namespaces: isolated from each other unless a policy allows")
	m.mustKubectl("create", "namespace", "tenant-b")
	m.apply(strings.Replace(netSandbox("t", img, "host-2", "{app: t}", "nc -ll -p 9090 -e cat & nettool udp-echo :5353 & wait"),
		"metadata:\n", "metadata:\n  namespace: tenant-b\n", 1))
	var ipT string
	waitFor(t, "tenant-b/t to run", 3*time.Minute, func() bool {
		out, _ := m.kubectl("get", "sandbox", "t", "-n", "tenant-b", "-o", "jsonpath={.status.phase} {.status.ip}")
		phase, ip, _ := strings.Cut(out, " ")
		ipT = ip
		return phase == "Running" && ip != ""
	})
	reach := func(when string, want bool) {
		t.Helper()
		m.expectSh(when+": a→t tcp", "a", "echo x | nc -w 2 "+ipT+" 9090", want)
		m.expectSh(when+": a→t udp", "a", "nettool udp "+ipT+":5353 x", want)
		m.expectSh(when+": a→t icmp", "a", "ping -c 1 -W 2 "+ipT, want)
	}
	reach("no policy", false)
	m.expectSh("t→a tcp (default is isolated too)", "tenant-b/t", "echo x | nc -w 2 "+ipA+" 7070", false)
	m.expectSh("t→b, another host, tcp", "tenant-b/t", "echo x | nc -w 2 "+ipB+" 9090", false)
	m.expectSh("a resolves t of tenant-b", "a", "nslookup t.tenant-b.hearth", false)
	m.expectSh("t resolves a of default", "tenant-b/t", "nslookup a.default.hearth", false)
	if out := m.expectSh("t resolves its own namespace", "tenant-b/t", "nslookup t.tenant-b.hearth", true); !strings.Contains(out, ipT) {
		t.Errorf("nslookup t.tenant-b.hearth in t: %s", out)
	}
	m.mustKubectlIn(`apiVersion: hearth.dev/v1alpha1
kind: NetworkPolicy
metadata: {name: from-default, namespace: tenant-b}
spec:
  sandboxSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}}]
`, "apply", "-f", "-")
	waitFor(t, "tenant-b's policy to reach host-2", 30*time.Second, func() bool {
		_, ok := m.shIn("a", "echo x | nc -w 2 "+ipT+" 9090")
		return ok
	})
	reach("a policy of tenant-b allows default", true)
	m.expectSh("t→a with tenant-b's policy (default's own decides)", "tenant-b/t", "echo x | nc -w 2 "+ipA+" 7070", false)

	// Another host's gateway (its range's first address) answers nothing;
	// a's own answers ICMP and DNS.
	gw2 := ipT[:strings.LastIndexByte(ipT, '.')] + ".1"
	gw1 := ipA[:strings.LastIndexByte(ipA, '.')] + ".1"
	m.expectSh("a→its own gateway icmp", "a", "ping -c 1 -W 2 "+gw1, true)
	m.expectSh("a→host-2's gateway icmp", "a", "ping -c 1 -W 2 "+gw2, false)
	m.expectSh("a→host-2's gateway dns", "a", "timeout 5 nslookup b.default.hearth "+gw2, false)
	m.mustKubectl("delete", "sandbox", "t", "-n", "tenant-b", "--timeout=2m")
}

// testNAT puts "the internet" behind host-1: a namespace routed from
// host-1 (198.51.100.0/24 on the link, a server at 203.0.113.5), which
// records where connections come from.
func testNAT(t *testing.T, m *multiHost, img, ipA string) {
	ext := "hdx-" + m.id
	host := m.hosts[0].ns
	m.sh("ip", "netns", "add", ext)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ext).Run() })
	m.sh("ip", "-n", ext, "link", "set", "lo", "up")
	m.sh("ip", "-n", host, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", ext)
	m.sh("ip", "-n", host, "addr", "add", "198.51.100.1/24", "dev", "ext0")
	m.sh("ip", "-n", host, "link", "set", "ext0", "up")
	m.sh("ip", "-n", ext, "addr", "add", "198.51.100.2/24", "dev", "eth0")
	m.sh("ip", "-n", ext, "addr", "add", "203.0.113.5/32", "dev", "lo")
	m.sh("ip", "-n", ext, "link", "set", "eth0", "up")
	m.sh("ip", "-n", host, "route", "add", "203.0.113.0/24", "via", "198.51.100.2")
	ln, err := nettest.Listen(ext, "tcp", "203.0.113.5:80")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	from := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			from <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			_, _ = c.Write([]byte("outside\n"))
			c.Close()
		}
	}()
	if out := m.expectSh("a to the outside", "a", "nc -w 3 203.0.113.5 80 </dev/null", true); out != "outside" {
		t.Errorf("a to the outside: %q", out)
	}
	select {
	case src := <-from:
		if src != "198.51.100.1" {
			t.Errorf("the outside saw %s, want host-1's address 198.51.100.1 (a is %s)", src, ipA)
		}
	case <-time.After(5 * time.Second):
		t.Error("the outside saw no connection")
	}
	m.apply(strings.Replace(netSandbox("closed", img, "host-1", "", "sleep 3600"), "  ports:", "  network: {nat: false}\n  ports:", 1))
	m.waitPhase("closed", 3*time.Minute, "Running")
	m.expectSh("no NAT: the outside", "closed", "nc -w 2 203.0.113.5 80 </dev/null", false)
	if ip := m.field("b", ".status.ip"); ip != "" {
		m.expectSh("no NAT: another sandbox", "closed", "echo in | nc -w 3 "+ip+" 9090", true)
	}
	m.mustKubectl("delete", "sandbox", "closed")
}

func testIngress(t *testing.T, m *multiHost, ipB string) {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			_, port, _ := net.SplitHostPort(addr)
			return dialIn("hdc-"+m.id, cpAddr+":"+port)
		},
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	get := func(url string, hdr ...string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, _ = fmt.Fprint(&b, "")
		buf := make([]byte, 4096)
		n, _ := resp.Body.Read(buf)
		return resp.StatusCode, strings.TrimSpace(string(buf[:n]))
	}
	// curl from the control plane's namespace: HTTP/1.1, h2c, h2 over TLS.
	curl := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"netns", "exec", "hdc-" + m.id, "curl", "-sS", "--max-time", "10"}, args...)...).CombinedOutput()
		if err != nil {
			t.Errorf("curl %v: %v\n%s", args, err, out)
		}
		return strings.ReplaceAll(strings.TrimSpace(string(out)), "\n", "")
	}
	host := "8080-b-default.hearth.test"
	resolve := func(port string) string { return host + ":" + port + ":" + cpAddr }
	if got := curl("--resolve", resolve("8480"), "-w", " %{http_version}", "http://"+host+":8480/one"); got != "hello-from-b /one 1.1" {
		t.Errorf("HTTP/1.1 through the ingress: %q", got)
	}
	if got := curl("--http2-prior-knowledge", "--resolve", resolve("8480"), "-w", " %{http_version}", "http://"+host+":8480/two"); got != "hello-from-b /two 2" {
		t.Errorf("h2c through the ingress: %q", got)
	}
	if got := curl("-k", "--http2", "--resolve", resolve("8443"), "-w", " %{http_version}", "https://"+host+":8443/three"); got != "hello-from-b /three 2" {
		t.Errorf("h2 over TLS through the ingress: %q", got)
	}

	t.Log("WebSocket echo")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws://8081-b-default.hearth.test:8480/", &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		t.Fatalf("WebSocket through the ingress: %v", err)
	}
	for _, msg := range []string{"first", "second"} {
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, b, err := ws.Read(ctx); err != nil || string(b) != msg {
			t.Errorf("WebSocket echo of %q: %q, %v", msg, b, err)
		}
	}
	ws.Close(websocket.StatusNormalClosure, "")

	t.Log("routes: TLS by SNI, access tokens, 502, 503, 504")
	certPEM, keyPEM := testCert(t, "app.example.test")
	m.mustKubectl("create", "secret", "tls", "app-tls", "--cert", writeTemp(t, certPEM), "--key", writeTemp(t, keyPEM))
	m.mustKubectl("create", "secret", "generic", "app-token", "--from-literal=token=s3cret")
	m.mustKubectlIn(`apiVersion: hearth.dev/v1alpha1
kind: Route
metadata: {name: app}
spec: {host: app.example.test, sandbox: b, port: http, tlsSecret: app-tls}
---
apiVersion: hearth.dev/v1alpha1
kind: Route
metadata: {name: private}
spec: {host: app.example.test, pathPrefix: /private, sandbox: b, port: 8080, accessTokenSecret: app-token}
---
apiVersion: hearth.dev/v1alpha1
kind: Route
metadata: {name: gone}
spec: {host: gone.example.test, sandbox: nobody, port: 8080}
---
apiVersion: hearth.dev/v1alpha1
kind: Route
metadata: {name: slow}
spec: {host: slow.example.test, sandbox: b, port: 8082, timeoutSeconds: 1}
---
apiVersion: hearth.dev/v1alpha1
kind: Route
metadata: {name: waiting}
spec: {host: waiting.example.test, sandbox: pending, port: 8080}
`, "apply", "-f", "-")
	m.apply(netSandbox("pending", "no-such-image-needed", "host-9", "", "true"))
	caFile := writeTemp(t, certPEM)
	waitFor(t, "the route to be served", 20*time.Second, func() bool {
		out, _ := exec.Command("ip", "netns", "exec", "hdc-"+m.id, "curl", "-sS", "--max-time", "5", "--cacert", caFile,
			"--resolve", "app.example.test:8443:"+cpAddr, "https://app.example.test:8443/sni").CombinedOutput()
		return strings.TrimSpace(string(out)) == "hello-from-b /sni"
	})
	for _, tc := range []struct {
		url  string
		hdr  []string
		code int
		has  string
	}{
		{"http://app.example.test:8480/private/x", nil, 401, "needs an access token"},
		{"http://app.example.test:8480/private/x", []string{"Authorization", "Bearer wrong"}, 401, "wrong access token"},
		{"http://app.example.test:8480/private/x", []string{"Authorization", "Bearer s3cret"}, 200, "hello-from-b /private/x"},
		{"http://app.example.test:8480/privateer", nil, 200, "hello-from-b /privateer"},
		{"http://gone.example.test:8480/", nil, 502, "does not exist"},
		{"http://waiting.example.test:8480/", nil, 503, "not running yet"},
		{"http://slow.example.test:8480/", nil, 504, "did not answer in time"},
		{"http://9999-b-default.hearth.test:8480/", nil, 502, "could not be reached"},
		// b serves 8082 (the slow route's) and 9090, not public: the
		// generated names do not reach them, only a Route does.
		{"http://8082-b-default.hearth.test:8480/", nil, 404, "port 8082 of sandbox default/b is not public"},
		{"http://9090-b-default.hearth.test:8480/", nil, 404, "port 9090 of sandbox default/b is not public"},
		{"http://8080-nobody-default.hearth.test:8480/", nil, 502, "no sandbox"},
	} {
		code, body := get(tc.url, tc.hdr...)
		if code != tc.code || !strings.Contains(body, tc.has) {
			t.Errorf("GET %s %v: %d %q, want %d with %q", tc.url, tc.hdr, code, body, tc.code, tc.has)
		}
	}
	// The sandbox goes and comes back on the other host, with another
	// address: the ingress follows it.
	m.mustKubectl("delete", "sandbox", "b")
	m.apply(netSandbox("b", m.field("a", ".spec.image"), "host-1", "", "nettool http :8080 b-again"))
	m.waitPhase("b", 3*time.Minute, "Running")
	if ip := m.field("b", ".status.ip"); ip == ipB {
		t.Errorf("b came back with the same address %s on another host", ip)
	}
	waitFor(t, "the ingress to follow b", 10*time.Second, func() bool {
		code, body := get("http://" + host + ":8480/moved")
		return code == 200 && body == "b-again /moved"
	})
}

func writeTemp(t *testing.T, b []byte) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "pem")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// testCert is a self-signed certificate for name.
func testCert(t *testing.T, name string) (certPEM, keyPEM []byte) {
	t.Helper()
	certPEM, keyPEM, err := pki.SelfSigned([]string{name}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM
}
