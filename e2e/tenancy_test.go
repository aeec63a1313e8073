package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/client-go/tools/clientcmd"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/testenv"
)

// as runs kubectl with another kubeconfig than the admin's.
func (c *cluster) as(kubeconfig string, args ...string) (string, error) {
	return c.asIn(kubeconfig, "", args...)
}

func (c *cluster) asIn(kubeconfig, stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestTenants: users made with `hearth user create` reach their own
// namespace only, as far as their role goes, through real kubectl and the
// hearth CLI against the real API server: every read, write and stream
// into another tenant's namespace is 403, `kubectl auth can-i` agrees, a
// view user cannot exec, an admin cannot grant more than it holds, a node
// identity reads no Secrets and creates no sandboxes, and deleting a user
// takes its access away.
func TestTenants(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	c := startCluster(t, h)
	dir := t.TempDir()
	kc := map[string]string{}
	for _, u := range []struct{ name, ns, role string }{
		{"alice", "team-a", "edit"}, {"vera", "team-a", "view"}, {"bob", "team-b", "edit"}, {"carol", "team-c", "admin"},
	} {
		kc[u.name] = filepath.Join(dir, u.name+".kubeconfig")
		r := c.hearth("", "user", "create", u.name, "--namespace", u.ns, "--role", u.role, "--ttl", "1h", "--data-dir", c.dataDir, "--out", kc[u.name])
		if r.code != 0 || !strings.Contains(r.stdout, "user "+u.name+" is "+u.role+" in namespace "+u.ns) {
			t.Fatalf("user create %s: exit %d, %s %s", u.name, r.code, r.stdout, r.stderr)
		}
		if st, err := os.Stat(kc[u.name]); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s's kubeconfig: %v, mode %v; want 0600 (it holds a key)", u.name, err, st.Mode())
		}
	}
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"system:x", "--namespace", "team-a", "--role", "view"}, `user name "system:x"`},
		{[]string{"hearth-node:host-1", "--namespace", "team-a", "--role", "view"}, `user name "hearth-node:host-1"`},
		{[]string{"eve", "--namespace", "team-a", "--role", "root"}, `--role "root": want one of view, edit, admin`},
		{[]string{"eve", "--namespace", "team-a", "--role", "view", "--ttl", "9000h"}, "--ttl 9000h0m0s: must be from 1m0s to 8784h0m0s"},
		{[]string{"eve", "--role", "view"}, "--namespace is required"},
		{[]string{"eve", "--namespace", "default", "--role", "view"}, "--namespace default is hearth's own"},
		{[]string{"alice", "--namespace", "team-b", "--role", "view"}, "user alice already has access to namespace team-a"},
	} {
		r := c.hearth("", append([]string{"user", "create", "--data-dir", c.dataDir, "--out", filepath.Join(dir, "eve")}, bad.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, bad.want) {
			t.Errorf("user create %v: exit %d, %q; want %q", bad.args, r.code, r.stderr, bad.want)
		}
	}

	// alice runs a sandbox in her namespace (her kubeconfig's), bob in his.
	for _, u := range []struct{ user, name string }{{"alice", "a1"}, {"bob", "b1"}} {
		if out, err := c.asIn(kc[u.user], sandboxYAML(u.name, img, "", "", "sh", "-c", "echo hello from "+u.name+"; sleep 1000"), "apply", "-f", "-"); err != nil {
			t.Fatalf("%s creates a sandbox: %v\n%s", u.user, err, out)
		}
	}
	// Images from files on the node are the admin's.
	for _, ref := range []string{"docker-archive:/etc/shadow", "oci:/tmp/layout:1"} {
		out, err := c.asIn(kc["alice"], sandboxYAML("local", ref, "", "", "true"), "apply", "-f", "-")
		if err == nil || !strings.Contains(out, "images from files on the host (oci:, docker-archive:) are for the admin") {
			t.Errorf("alice's sandbox of %s: %v\n%s", ref, err, out)
		}
	}
	// A registry on the node's loopback is not a tenant's to pull from
	// (but for 127.0.0.1, which the cluster lists: --private-registry).
	reg := testenv.StartRegistryOn(t, "127.0.0.3")
	guarded := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}, nil), "guarded:1")
	if out, err := c.asIn(kc["alice"], sandboxYAML("loopback", guarded, "", "", "true"), "apply", "-f", "-"); err != nil {
		t.Fatalf("alice's sandbox from a loopback registry: %v\n%s", err, out)
	}
	waitFor(t, "the loopback pull to be refused", 2*time.Minute, func() bool {
		out, _ := c.as(kc["alice"], "get", "sandbox", "loopback", "-o", "jsonpath={.status.phase} {.status.message}")
		return strings.HasPrefix(out, "Failed ") && strings.Contains(out, "registry "+reg.Addr+" is at 127.0.0.3")
	})
	if out, err := c.as(kc["alice"], "delete", "sandbox", "loopback"); err != nil {
		t.Errorf("alice deletes her sandbox: %v\n%s", err, out)
	}
	for _, ns := range []string{"team-a", "team-b"} {
		out, err := c.kubectl("wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", "sandboxes", "--all", "--timeout=3m")
		if err != nil {
			t.Fatalf("sandboxes in %s: %v\n%s", ns, err, out)
		}
	}

	testPullSecrets(t, c, kc["alice"], kc["bob"])

	forbidden := func(user string, args ...string) {
		t.Helper()
		out, err := c.as(kc[user], args...)
		if err == nil || !strings.Contains(out, "Forbidden") && !strings.Contains(out, "forbidden") {
			t.Errorf("%s: kubectl %s: %v\n%s\nwant 403 Forbidden", user, strings.Join(args, " "), err, out)
		}
	}
	allowed := func(user string, args ...string) string {
		t.Helper()
		out, err := c.as(kc[user], args...)
		if err != nil {
			t.Errorf("%s: kubectl %s: %v\n%s", user, strings.Join(args, " "), err, out)
		}
		return out
	}

	// alice against team-b: every verb, every kind, and the streams.
	for _, args := range [][]string{
		{"get", "sandbox", "b1", "-n", "team-b"},
		{"get", "sandboxes", "-n", "team-b"},
		{"get", "sandboxes", "-n", "team-b", "--watch", "--request-timeout=5s"},
		{"get", "sandboxes", "--all-namespaces"},
		{"delete", "sandbox", "b1", "-n", "team-b", "--wait=false"},
		{"patch", "sandbox", "b1", "-n", "team-b", "--type=merge", "-p", `{"metadata":{"labels":{"x":"y"}}}`},
		{"get", "snapshots", "-n", "team-b"},
		{"get", "sandboxtemplates", "-n", "team-b"},
		{"get", "warmpools", "-n", "team-b"},
		{"get", "routes", "-n", "team-b"},
		{"get", "secrets", "-n", "team-b"},
		{"create", "secret", "generic", "s", "-n", "team-b", "--from-literal=k=v"},
		{"get", "hosts"},
		{"get", "--raw", "/apis/hearth.dev/v1alpha1/namespaces/team-b/sandboxes/b1/log"},
		// Her own sandbox's status is the system's.
		{"patch", "sandbox", "a1", "--subresource=status", "--type=merge", "-p", `{"status":{"hostName":"elsewhere"}}`},
		{"create", "rolebinding", "x", "--clusterrole=admin", "--user=alice"},
	} {
		forbidden("alice", args...)
	}
	// A host name is the namespace's whose Route claimed it first: bob's
	// app.team-b.example is not alice's to take (testdata/route.yaml).
	if out, err := c.asIn(kc["bob"], "apiVersion: hearth.dev/v1alpha1\nkind: Route\nmetadata: {name: app}\nspec: {host: app.team-b.example, sandbox: b1, port: 8080}\n", "apply", "-f", "-"); err != nil {
		t.Fatalf("bob's route: %v\n%s", err, out)
	}
	if out, err := c.as(kc["alice"], "create", "-f", "testdata/route.yaml"); err == nil || !strings.Contains(out, `spec.host "app.team-b.example" belongs to another namespace`) {
		t.Errorf("alice's route on bob's host name: %v\n%s", err, out)
	}
	if out, err := c.asIn(kc["alice"], "apiVersion: hearth.dev/v1alpha1\nkind: Route\nmetadata: {name: app}\nspec: {host: app.team-a.example, sandbox: a1, port: 8080}\n", "apply", "-f", "-"); err != nil {
		t.Errorf("alice's route on a host name of her own: %v\n%s", err, out)
	}
	// The ingress's own names (PORT-SANDBOX-NAMESPACE.DOMAIN) are no
	// Route's; and a namespace the admin gave names takes only those.
	if out, err := c.asIn(kc["alice"], "apiVersion: hearth.dev/v1alpha1\nkind: Route\nmetadata: {name: squat}\nspec: {host: 8080-b1-team-b.hearth.localhost, sandbox: a1, port: 8080}\n", "create", "-f", "-"); err == nil || !strings.Contains(out, "under the ingress's domain") {
		t.Errorf("alice's route on the ingress's name of bob's sandbox: %v\n%s", err, out)
	}
	c.mustKubectl("annotate", "namespace", "team-a", v1alpha1.AnnotationRouteHosts+"=.team-a.example")
	if out, err := c.asIn(kc["alice"], "apiVersion: hearth.dev/v1alpha1\nkind: Route\nmetadata: {name: squat}\nspec: {host: login.bank.example, sandbox: a1, port: 8080}\n", "create", "-f", "-"); err == nil || !strings.Contains(out, "not one this namespace may take") {
		t.Errorf("alice's route on a name her namespace was not given: %v\n%s", err, out)
	}
	forbidden("alice", "annotate", "namespace", "team-a", "--overwrite", v1alpha1.AnnotationRouteHosts+"=.example")
	for _, sub := range [][]string{
		{"exec", "--namespace", "team-b", "b1", "--", "true"},
		{"logs", "--namespace", "team-b", "b1"},
	} {
		h2 := *c.h
		h2.env = append(append([]string(nil), c.h.env...), "KUBECONFIG="+kc["alice"])
		if r := h2.run("", sub...); r.code == 0 || !strings.Contains(r.stderr, "forbidden") {
			t.Errorf("alice: hearth %v into team-b: exit %d, %s; want forbidden", sub, r.code, r.stderr)
		}
	}
	// ... and what she may do at home.
	if out := allowed("alice", "get", "sandbox", "a1", "-o", "jsonpath={.status.phase}"); out != "Running" {
		t.Errorf("alice's own sandbox: %q", out)
	}
	aliceCLI := *c.h
	aliceCLI.env = append(append([]string(nil), c.h.env...), "KUBECONFIG="+kc["alice"])
	if r := aliceCLI.run("", "exec", "a1", "--", "echo", "in"); r.code != 0 || r.stdout != "in\n" {
		t.Errorf("alice execs into her sandbox: exit %d, %q %s", r.code, r.stdout, r.stderr)
	}
	for _, q := range []struct {
		user string
		args []string
		want string
	}{
		{"alice", []string{"create", "sandboxes"}, "yes"},
		{"alice", []string{"create", "sandboxes", "--subresource=exec"}, "yes"},
		{"alice", []string{"create", "sandboxes", "-n", "team-b"}, "no"},
		{"alice", []string{"get", "secrets", "-n", "team-b"}, "no"},
		{"alice", []string{"update", "sandboxes", "--subresource=status"}, "no"},
		{"vera", []string{"get", "sandboxes"}, "yes"},
		{"vera", []string{"get", "sandboxes", "--subresource=log"}, "yes"},
		{"vera", []string{"create", "sandboxes", "--subresource=exec"}, "no"},
		{"vera", []string{"get", "secrets"}, "no"},
		{"carol", []string{"create", "rolebindings"}, "yes"},
		{"carol", []string{"create", "rolebindings", "-n", "team-a"}, "no"},
	} {
		out, _ := c.as(kc[q.user], append([]string{"auth", "can-i"}, q.args...)...)
		if strings.TrimSpace(out) != q.want {
			t.Errorf("%s: kubectl auth can-i %s: %q, want %s", q.user, strings.Join(q.args, " "), out, q.want)
		}
	}
	if out := allowed("vera", "auth", "can-i", "--list"); !strings.Contains(out, "sandboxes.hearth.dev") {
		t.Errorf("vera: auth can-i --list lists no sandboxes:\n%s", out)
	}

	// vera (view) reads, and does not exec or write.
	allowed("vera", "get", "sandboxes")
	if out := allowed("vera", "get", "--raw", "/apis/hearth.dev/v1alpha1/namespaces/team-a/sandboxes/a1/log"); !strings.Contains(out, "hello from a1") {
		t.Errorf("vera reads a1's log: %q", out)
	}
	veraCLI := *c.h
	veraCLI.env = append(append([]string(nil), c.h.env...), "KUBECONFIG="+kc["vera"])
	if r := veraCLI.run("", "exec", "a1", "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "forbidden") {
		t.Errorf("vera execs: exit %d, %s; want forbidden", r.code, r.stderr)
	}
	forbidden("vera", "delete", "sandbox", "a1", "--wait=false")

	// carol (admin of team-c) may grant what she holds, not more.
	allowed("carol", "create", "rolebinding", "dave-edit", "--clusterrole=edit", "--user=dave")
	forbidden("carol", "create", "rolebinding", "dave-node", "--clusterrole=hearth:node", "--user=dave")
	forbidden("carol", "create", "role", "everything", "--verb=*", "--resource=*.*")
	forbidden("carol", "create", "role", "hosts", "--verb=get", "--resource=hosts.hearth.dev")
	allowed("carol", "create", "role", "readers", "--verb=get", "--resource=sandboxes.hearth.dev")

	// A user's certificate is no key to a node agent's streams (their CA
	// is another): refused at the TLS handshake.
	testStreamsCA(t, c, kc["alice"])

	// A node's identity: no Secrets, no sandboxes of its own making, no
	// roles.
	node := filepath.Join(dir, "node.kubeconfig")
	server := strings.TrimSpace(c.mustKubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}"))
	pkiDir := filepath.Join(c.dataDir, "pki")
	for _, args := range [][]string{
		{"config", "set-cluster", "h", "--server", server, "--certificate-authority", filepath.Join(pkiDir, "ca.crt")},
		{"config", "set-credentials", "n", "--client-certificate", filepath.Join(pkiDir, "node-host-1-client.crt"), "--client-key", filepath.Join(pkiDir, "node-host-1-client.key")},
		{"config", "set-context", "h", "--cluster", "h", "--user", "n"},
		{"config", "use-context", "h"},
	} {
		if out, err := c.as(node, args...); err != nil {
			t.Fatalf("node kubeconfig: %v %s", err, out)
		}
	}
	kc["node"] = node
	allowed("node", "get", "sandboxes", "--all-namespaces")
	forbidden("node", "get", "secrets", "--all-namespaces")
	forbidden("node", "create", "namespace", "node-made")
	forbidden("node", "create", "clusterrolebinding", "x", "--clusterrole=admin", "--user=hearth-node:host-1")
	// ... and, past RBAC, its own only (node restriction): it may not
	// rebind a sandbox, change a spec, or write the controllers' lease.
	allowed("node", "annotate", "sandbox", "a1", "-n", "team-a", "hearth.dev/test=1")
	forbidden("node", "patch", "sandbox", "a1", "-n", "team-a", "--subresource=status", "--type=merge", "-p", `{"status":{"hostName":"host-2"}}`)
	forbidden("node", "patch", "sandbox", "a1", "-n", "team-a", "--type=merge", "-p", `{"spec":{"command":["evil"]}}`)
	// An address outside its Host's range: another sandbox's, for all a
	// policy, DNS or the ingress could tell.
	forbidden("node", "patch", "sandbox", "a1", "-n", "team-a", "--subresource=status", "--type=merge", "-p", `{"status":{"ip":"192.0.2.1"}}`)
	forbidden("node", "patch", "lease", "hearth-controllers", "-n", "hearth-system", "--type=merge", "-p", `{"spec":{"holderIdentity":"evil"}}`)
	allowed("node", "annotate", "host", "host-1", "hearth.dev/test=1")
	// Another host's node agent, joined with credentials from `hearth host
	// credentials`, may not write host-1's sandboxes or Host.
	if r := c.hearth("", "host", "credentials", "host-2", "--address", "127.0.0.2", "--out", filepath.Join(dir, "host-2"), "--data-dir", c.dataDir); r.code != 0 {
		t.Fatalf("host credentials: exit %d %s", r.code, r.stderr)
	}
	other := filepath.Join(dir, "node2.kubeconfig")
	for _, args := range [][]string{
		{"config", "set-cluster", "h", "--server", server, "--certificate-authority", filepath.Join(pkiDir, "ca.crt")},
		{"config", "set-credentials", "n", "--client-certificate", filepath.Join(dir, "host-2", "pki", "node-host-2-client.crt"), "--client-key", filepath.Join(dir, "host-2", "pki", "node-host-2-client.key")},
		{"config", "set-context", "h", "--cluster", "h", "--user", "n"},
		{"config", "use-context", "h"},
	} {
		if out, err := c.as(other, args...); err != nil {
			t.Fatalf("node kubeconfig: %v %s", err, out)
		}
	}
	kc["node2"] = other
	forbidden("node2", "patch", "sandbox", "a1", "-n", "team-a", "--subresource=status", "--type=merge", "-p", `{"status":{"phase":"Failed"}}`)
	forbidden("node2", "annotate", "sandbox", "a1", "-n", "team-a", "x=y")
	forbidden("node2", "delete", "sandbox", "a1", "-n", "team-a", "--wait=false")
	forbidden("node2", "annotate", "host", "host-1", "x=y")
	forbidden("node2", "patch", "host", "host-1", "--subresource=status", "--type=merge", "-p", `{"status":{"address":"127.0.0.2:10250"}}`)

	// A token for a program: view in team-a, kept hashed, revoked at once.
	r := c.hearth("", "token", "create", "ci", "--namespace", "team-a", "--role", "view")
	token := strings.TrimSpace(r.stdout)
	if r.code != 0 || !strings.HasPrefix(token, "hearth_") || !strings.Contains(r.stderr, "user ci is view in namespace team-a") {
		t.Fatalf("token create: exit %d, %q %s", r.code, r.stdout, r.stderr)
	}
	if r := c.hearth("", "token", "create", "ci", "--namespace", "hearth-system", "--role", "admin"); r.code == 0 || !strings.Contains(r.stderr, "hearth's own") {
		t.Errorf("a token for hearth-system: exit %d, %s", r.code, r.stderr)
	}
	id, secret, _ := strings.Cut(strings.TrimPrefix(token, "hearth_"), ".")
	if kept := c.mustKubectl("get", "secret", "-n", "hearth-system", "token-"+id, "-o", `go-template={{range .data}}{{.|base64decode}}{{"\n"}}{{end}}`); strings.Contains(kept, secret) || !strings.Contains(kept, pki.HashTokenSecret(secret)) {
		t.Errorf("the token's secret is kept in the clear:\n%s", kept)
	}
	tk := filepath.Join(dir, "token.kubeconfig")
	for _, args := range [][]string{
		{"config", "set-cluster", "h", "--server", server, "--certificate-authority", filepath.Join(pkiDir, "ca.crt")},
		{"config", "set-credentials", "ci", "--token", token},
		{"config", "set-context", "h", "--cluster", "h", "--user", "ci", "--namespace", "team-a"},
		{"config", "use-context", "h"},
	} {
		if out, err := c.as(tk, args...); err != nil {
			t.Fatalf("token kubeconfig: %v %s", err, out)
		}
	}
	kc["ci"] = tk
	if out := allowed("ci", "get", "sandbox", "a1", "-o", "jsonpath={.metadata.name}"); out != "a1" {
		t.Errorf("ci reads a1: %q", out)
	}
	forbidden("ci", "delete", "sandbox", "a1", "--wait=false")
	forbidden("ci", "get", "sandboxes", "-n", "team-b")
	if out := c.hearth("", "token", "list").stdout; !strings.Contains(out, id) || !strings.Contains(out, "ci") || strings.Contains(out, secret) {
		t.Errorf("token list:\n%s", out)
	}
	if r := c.hearth("", "token", "delete", id); r.code != 0 {
		t.Fatalf("token delete: exit %d %s", r.code, r.stderr)
	}
	if out, err := c.as(tk, "get", "sandboxes"); err == nil || !strings.Contains(out, "Unauthorized") {
		t.Errorf("a revoked token, at once: %v %s; want Unauthorized", err, out)
	}

	// The audit log says who did what: exec, deletes (refused ones too),
	// role grants with what they granted; not the reads.
	checkAudit(t, filepath.Join(c.dataDir, "audit.log"))

	// Deleting a user takes its access away (the authorizer's cache sees
	// the binding go within moments).
	if r := c.hearth("", "user", "delete", "alice", "--namespace", "team-a", "--data-dir", c.dataDir); r.code != 0 {
		t.Fatalf("user delete: exit %d %s", r.code, r.stderr)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		out, err := c.as(kc["alice"], "get", "sandboxes")
		if err != nil && strings.Contains(out, "forbidden") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("alice still reads team-a 2 s after her deletion: %v %s", err, out)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestQuotas: a namespace's ResourceQuota refuses the create past it,
// naming the quota, counts concurrent creates exactly, and gives room
// back when sandboxes go.
func TestQuotas(t *testing.T) {
	h := newHarness(t)
	c := startCluster(t, h)
	dir := t.TempDir()
	alice := filepath.Join(dir, "alice.kubeconfig")
	if r := c.hearth("", "user", "create", "alice", "--namespace", "team-q", "--role", "edit", "--data-dir", c.dataDir, "--out", alice); r.code != 0 {
		t.Fatalf("user create: exit %d %s", r.code, r.stderr)
	}
	if out, err := c.kubectlIn("apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: q, namespace: team-q}\nspec:\n  hard: {pods: '3'}\n", "apply", "-f", "-"); err == nil || !strings.Contains(out, `spec.hard[pods]: Unsupported value: "pods"`) {
		t.Errorf("a quota of pods: %v\n%s", err, out)
	}
	c.mustKubectlIn("apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: team-q-quota, namespace: team-q}\nspec:\n  hard: {count/sandboxes.hearth.dev: '4', requests.memory: 1Gi}\n", "apply", "-f", "-")
	used := func(res string) string {
		out, _ := c.kubectl("get", "resourcequota", "team-q-quota", "-n", "team-q", "-o", "go-template={{index .status.used \""+res+"\"}}")
		return out
	}
	waitUsed := func(res, want string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for used(res) != want {
			if time.Now().After(deadline) {
				t.Fatalf("quota used %s: %q, want %q", res, used(res), want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitUsed("count/sandboxes.hearth.dev", "0")
	// Pending forever (no host matches): the quota counts objects, not VMs.
	create := func(name, memory string) (string, error) {
		return c.asIn(alice, strings.Replace(sandboxYAML(name, "registry.example/tools:1", "", "  hostSelector: {none: none}\n", "true"),
			"memory: 128Mi", "memory: "+memory, 1), "create", "-f", "-")
	}
	for _, n := range []string{"s1", "s2"} {
		if out, err := create(n, "128Mi"); err != nil {
			t.Fatalf("create %s: %v %s", n, err, out)
		}
	}
	if out, err := create("big", "900Mi"); err == nil || !strings.Contains(out, "exceeded quota: team-q-quota, requested: requests.memory=900Mi, used: requests.memory=256Mi, limited: requests.memory=1Gi") {
		t.Errorf("a sandbox past the memory quota: %v\n%s", err, out)
	}
	// Two slots left, six creates at once: exactly two get through.
	var mu sync.Mutex
	ok := 0
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := create(fmt.Sprintf("race-%d", i), "128Mi")
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				ok++
			} else if !strings.Contains(out, "exceeded quota: team-q-quota") {
				t.Errorf("race-%d refused for another reason: %s", i, out)
			}
		}()
	}
	wg.Wait()
	if ok != 2 {
		t.Errorf("%d of 6 concurrent creates got the quota's last 2 slots", ok)
	}
	waitUsed("count/sandboxes.hearth.dev", "4")
	if out, err := c.as(alice, "patch", "resourcequota", "team-q-quota", "--type=merge", "-p", `{"spec":{"hard":{"count/sandboxes.hearth.dev":"100"}}}`); err == nil || !strings.Contains(out, "forbidden") {
		t.Errorf("alice raises her own quota: %v %s", err, out)
	}
	// Room comes back when a sandbox goes.
	if out, err := c.as(alice, "delete", "sandbox", "s1", "--timeout=1m"); err != nil {
		t.Fatalf("delete s1: %v %s", err, out)
	}
	waitUsed("count/sandboxes.hearth.dev", "3")
	if out, err := create("s3", "128Mi"); err != nil {
		t.Errorf("a create after one was deleted: %v %s", err, out)
	}

	// LimitRanges: a namespace's defaults and maxima (the admin's to set).
	limits := "apiVersion: v1\nkind: LimitRange\nmetadata: {name: sandbox-limits, namespace: %s}\nspec:\n  limits:\n  - type: %s\n    default: {memory: 96Mi}\n    max: {memory: 512Mi}\n"
	if out, err := c.asIn(alice, fmt.Sprintf(limits, "team-q", "Sandbox"), "create", "-f", "-"); err == nil || !strings.Contains(out, "forbidden") {
		t.Errorf("alice sets her own LimitRange: %v %s", err, out)
	}
	if out, err := c.kubectlIn(fmt.Sprintf(limits, "team-q", "Container"), "create", "-f", "-"); err == nil || !strings.Contains(out, `Unsupported value: "Container"`) {
		t.Errorf("a LimitRange of containers: %v\n%s", err, out)
	}
	c.mustKubectl("create", "namespace", "team-l")
	c.mustKubectlIn(fmt.Sprintf(limits, "team-l", "Sandbox"), "create", "-f", "-")
	unsized := strings.Replace(sandboxYAML("unsized", "registry.example/tools:1", "", "  hostSelector: {none: none}\n", "true"),
		"resources: {cpu: 500m, memory: 128Mi, disk: 64Mi}", "resources: {cpu: 500m}", 1)
	c.mustKubectlIn(unsized, "create", "-n", "team-l", "-f", "-")
	if out, _ := c.kubectl("get", "sandbox", "unsized", "-n", "team-l", "-o", "jsonpath={.spec.resources.memory} {.spec.resources.disk}"); out != "96Mi 1Gi" {
		t.Errorf("a sandbox without memory under a LimitRange: memory and disk %q, want the LimitRange's 96Mi and the cluster's 1Gi", out)
	}
	big := strings.Replace(unsized, "name: unsized", "name: big", 1)
	big = strings.Replace(big, "resources: {cpu: 500m}", "resources: {cpu: 500m, memory: 1Gi}", 1)
	if out, err := c.kubectlIn(big, "create", "-n", "team-l", "-f", "-"); err == nil || !strings.Contains(out, "spec.resources.memory 1Gi is over the maximum 512Mi of LimitRange sandbox-limits") {
		t.Errorf("a sandbox over the LimitRange's maximum: %v\n%s", err, out)
	}
}

func testStreamsCA(t *testing.T, c *cluster, kubeconfig string) {
	t.Helper()
	cfg, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	var cert tls.Certificate
	for _, u := range cfg.AuthInfos {
		if cert, err = tls.X509KeyPair(u.ClientCertificateData, u.ClientKeyData); err != nil {
			t.Fatal(err)
		}
	}
	addr := strings.TrimSpace(c.mustKubectl("get", "host", "host-1", "-o", "jsonpath={.status.address}"))
	conn, err := tls.Dial("tcp", addr, &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true})
	if err == nil {
		defer conn.Close()
		_, _ = conn.Write([]byte("GET /sandboxes/team-b/b1/log HTTP/1.1\r\nHost: x\r\n\r\n"))
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a user's certificate on a node's stream server: %v, want a TLS certificate error", err)
	}
}

// testPullSecrets: alice pulls a private image with her namespace's pull
// secret; bob, whose sandbox names the same image on the same node, does
// not get it without credentials of his own.
func testPullSecrets(t *testing.T, c *cluster, alice, bob string) {
	t.Helper()
	reg := testenv.StartAuthRegistry(t, "alice", "s3cret")
	// Its own content: an image of the same digest pulled anonymously
	// (the tests' tools) is anyone's, wherever it was pulled from.
	ref := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}, Env: []string{"PRIVATE=alice"}}), "private:1")
	if out, err := c.as(alice, "create", "secret", "docker-registry", "pull", "--docker-server="+reg.Addr,
		"--docker-username=alice", "--docker-password=s3cret"); err != nil {
		t.Fatalf("alice's pull secret: %v\n%s", err, out)
	}
	phase := func(kubeconfig, name string) string {
		out, _ := c.as(kubeconfig, "get", "sandbox", name, "-o", "jsonpath={.status.phase} {.status.message}")
		return out
	}
	if out, err := c.asIn(alice, sandboxYAML("private", ref, "", "  imagePullSecrets: [{name: pull}]\n", "echo", "pulled"), "apply", "-f", "-"); err != nil {
		t.Fatalf("alice's sandbox: %v\n%s", err, out)
	}
	waitFor(t, "alice's private image to run", 3*time.Minute, func() bool { return strings.HasPrefix(phase(alice, "private"), "Succeeded") })
	if out, err := c.asIn(bob, sandboxYAML("private", ref, "", "", "echo", "pulled"), "apply", "-f", "-"); err != nil {
		t.Fatalf("bob's sandbox: %v\n%s", err, out)
	}
	last := ""
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the last sandbox waited for: %s", last)
		}
	})
	waitFor(t, "bob's pull of alice's image to fail", 2*time.Minute, func() bool {
		last = phase(bob, "private")
		return strings.HasPrefix(last, "Failed")
	})
	if got := phase(bob, "private"); !strings.Contains(got, "UNAUTHORIZED") && !strings.Contains(got, "401") {
		t.Errorf("bob's sandbox failed for another reason: %s", got)
	}
	for _, kc := range []string{alice, bob} {
		if out, err := c.as(kc, "delete", "sandbox", "private"); err != nil {
			t.Errorf("delete: %v %s", err, out)
		}
	}
	// A template pulls with its own pull secrets (an image no host holds
	// yet): every node may read those.
	tplRef := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}, Env: []string{"PRIVATE=template"}}), "template:1")
	tpl := strings.Replace(templateYAML("private-tpl", tplRef, "{exec: [\"true\"]}", "sleep", "100000"), "spec:\n", "spec:\n  imagePullSecrets: [{name: pull}]\n", 1)
	if out, err := c.asIn(alice, tpl, "apply", "-f", "-"); err != nil {
		t.Fatalf("alice's template: %v\n%s", err, out)
	}
	// A host builds it when a sandbox placed there first needs it.
	if out, err := c.asIn(alice, strings.Replace(claimYAML("from-tpl", ""), "{warmPool: }", "{template: private-tpl}", 1), "apply", "-f", "-"); err != nil {
		t.Fatalf("alice's sandbox from the template: %v\n%s", err, out)
	}
	waitFor(t, "alice's sandbox from a template of a private image to run", 3*time.Minute, func() bool {
		last = phase(alice, "from-tpl")
		return strings.HasPrefix(last, "Running")
	})
	if out, _ := c.as(alice, "get", "sandboxtemplate", "private-tpl", "-o", "jsonpath={.status.hosts[0].ready}"); out != "true" {
		t.Errorf("the template's host entry: ready %q, want true", out)
	}
	for _, kind := range []string{"sandbox/from-tpl", "sandboxtemplate/private-tpl"} {
		if out, err := c.as(alice, "delete", kind); err != nil {
			t.Errorf("delete %s: %v %s", kind, err, out)
		}
	}
}

// auditEvent is what checkAudit reads of an audit.k8s.io/v1 Event.
type auditEvent struct {
	Verb string `json:"verb"`
	User struct {
		Username string `json:"username"`
	} `json:"user"`
	ObjectRef *struct {
		Resource, Subresource, Namespace, Name string
	} `json:"objectRef"`
	ResponseStatus *struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
	RequestObject json.RawMessage   `json:"requestObject"`
	Annotations   map[string]string `json:"annotations"`
}

func checkAudit(t *testing.T, path string) {
	t.Helper()
	var events []auditEvent
	find := func(user, verb, resource, sub, ns string) *auditEvent {
		for i, e := range events {
			if e.User.Username == user && e.Verb == verb && e.ObjectRef != nil && e.ObjectRef.Resource == resource &&
				e.ObjectRef.Subresource == sub && e.ObjectRef.Namespace == ns {
				return &events[i]
			}
		}
		return nil
	}
	// Buffered: written within moments.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		events = events[:0]
		b, _ := os.ReadFile(path)
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var e auditEvent
			if json.Unmarshal([]byte(line), &e) == nil {
				events = append(events, e)
			}
		}
		if find("carol", "create", "rolebindings", "", "team-c") != nil || time.Now().After(deadline) {
			break
		}
	}
	if e := find("alice", "create", "sandboxes", "exec", "team-a"); e == nil {
		t.Errorf("no audit event of alice's exec into a1 (%d events)", len(events))
	}
	if e := find("alice", "delete", "sandboxes", "", "team-b"); e == nil || e.ResponseStatus == nil || e.ResponseStatus.Code != 403 ||
		e.Annotations["authorization.k8s.io/decision"] != "forbid" {
		t.Errorf("alice's refused delete in team-b: %+v", e)
	}
	if e := find("carol", "create", "rolebindings", "", "team-c"); e == nil || !strings.Contains(string(e.RequestObject), `"dave"`) {
		t.Errorf("carol's role binding, with what it granted: %+v", e)
	}
	if e := find("alice", "create", "secrets", "", "team-b"); e == nil || len(e.RequestObject) != 0 {
		t.Errorf("alice's secret create: recorded %v, with a body %q (want recorded, no body)", e != nil, func() string {
			if e == nil {
				return ""
			}
			return string(e.RequestObject)
		}())
	}
	if e := find("vera", "list", "sandboxes", "", "team-a"); e != nil {
		t.Errorf("a read is in the audit log: %+v", e)
	}
}
