package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"hearth.dev/hearth/internal/pki"
)

// as runs kubectl with another kubeconfig than the admin's.
func (c *cluster) as(kubeconfig string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig)
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
	} {
		r := c.hearth("", append([]string{"user", "create", "--data-dir", c.dataDir, "--out", filepath.Join(dir, "eve")}, bad.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, bad.want) {
			t.Errorf("user create %v: exit %d, %q; want %q", bad.args, r.code, r.stderr, bad.want)
		}
	}

	// alice runs a sandbox in her namespace (her kubeconfig's), bob in his.
	for _, u := range []struct{ user, name string }{{"alice", "a1"}, {"bob", "b1"}} {
		cmd := exec.Command("kubectl", "apply", "-f", "-")
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kc[u.user])
		cmd.Stdin = strings.NewReader(sandboxYAML(u.name, img, "", "", "sh", "-c", "echo hello from "+u.name+"; sleep 1000"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s creates a sandbox: %v\n%s", u.user, err, out)
		}
	}
	for _, ns := range []string{"team-a", "team-b"} {
		out, err := c.kubectl("wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", "sandboxes", "--all", "--timeout=3m")
		if err != nil {
			t.Fatalf("sandboxes in %s: %v\n%s", ns, err, out)
		}
	}

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
