package pki

import (
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestIssueAndReuse(t *testing.T) {
	dir := t.TempDir()
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	req := Request{Name: "node-a", CN: "hearth-node:a", Groups: []string{GroupNodes}, Client: true, Server: true, Hosts: []string{"127.0.0.1", "a.example"}}
	p, err := ca.Ensure(req)
	if err != nil {
		t.Fatal(err)
	}
	c, err := loadCert(p.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := c.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "a.example", KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for %v: %v", usage, err)
		}
	}
	if c.Subject.Organization[0] != GroupNodes || c.Subject.CommonName != "hearth-node:a" {
		t.Errorf("subject %v", c.Subject)
	}
	// The same request keeps the same certificate; another one replaces it.
	before, _ := os.Stat(p.CertFile)
	time.Sleep(10 * time.Millisecond)
	if _, err := ca.Ensure(req); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Stat(p.CertFile); !after.ModTime().Equal(before.ModTime()) {
		t.Error("an unchanged request reissued the certificate")
	}
	req.Hosts = append(req.Hosts, "b.example")
	if _, err := ca.Ensure(req); err != nil {
		t.Fatal(err)
	}
	if c, _ := loadCert(p.CertFile); c.VerifyHostname("b.example") != nil {
		t.Error("a new host did not reissue the certificate")
	}
	// A usage asked for since (node serving certificates became client
	// ones) reissues it.
	server := Request{Name: "node-s", CN: "hearth-node:s", Server: true, Hosts: []string{"127.0.0.1"}}
	if _, err := ca.Ensure(server); err != nil {
		t.Fatal(err)
	}
	server.Client = true
	ps, err := ca.Ensure(server)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := loadCert(ps.CertFile); c == nil || len(c.ExtKeyUsage) != 2 {
		t.Errorf("a certificate asked for client use too: usages %v", c.ExtKeyUsage)
	}
	// The CA is loaded, not made again.
	again, err := LoadOrCreateCA(dir)
	if err != nil || !again.Cert.Equal(ca.Cert) {
		t.Errorf("reloaded CA differs: %v", err)
	}
}

// A node that joins from another machine has the CA's certificate and its
// own certificates, not the CA's key: it finds what was issued for it and
// cannot issue more.
func TestJoinCredentials(t *testing.T) {
	cpDir, nodeDir := t.TempDir(), t.TempDir()
	ca, err := LoadOrCreateCA(cpDir)
	if err != nil {
		t.Fatal(err)
	}
	issuer, err := ca.Issuer(nodeDir)
	if err != nil {
		t.Fatal(err)
	}
	req := Request{Name: "node-a", CN: "hearth-node:a", Hosts: []string{"10.0.0.2"}, Server: true}
	if _, err := issuer.Ensure(req); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(nodeDir, "ca.key")); err == nil {
		t.Fatal("the CA key was copied to the node")
	}
	node, err := LoadCA(nodeDir, true)
	if err != nil {
		t.Fatal(err)
	}
	if !node.Cert.Equal(ca.Cert) {
		t.Error("the node's CA certificate is not the cluster's")
	}
	if _, err := node.Ensure(req); err != nil {
		t.Errorf("finding the issued certificate: %v", err)
	}
	req.Hosts = []string{"10.0.0.3"}
	if _, err := node.Ensure(req); !errors.Is(err, ErrNoCAKey) {
		t.Errorf("issuing without the CA key: %v, want ErrNoCAKey", err)
	}
	if _, err := LoadCA(t.TempDir(), true); err == nil {
		t.Error("LoadCA of an empty directory that must hold a CA succeeded")
	}
}
