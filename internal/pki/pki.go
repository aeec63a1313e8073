// Package pki makes and keeps the certificates of a hearth control plane,
// under three CAs generated into the data directory, so that an identity
// of one never opens another: the API's (DATA/pki) signs the API server's
// serving certificate and the client certificates of the admin kubeconfig,
// of node agents and of users (`hearth user create`, short-lived); etcd's
// (DATA/pki/etcd) signs etcd's certificate and the API server's client to
// it; the streams' (DATA/pki/streams) signs the node agents' serving
// certificates for the streams the API server proxies to them and the API
// server's client to them. It also makes the bearer tokens of programs
// (token.go).
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"
)

// Groups that client certificates carry as their Organization.
const (
	// GroupAdmin is Kubernetes' privileged group: all of the API.
	GroupAdmin = "system:masters"
	// GroupNodes are node agents.
	GroupNodes = "hearth:nodes"
	// GroupAPIServer is the API server calling a node agent.
	GroupAPIServer = "hearth:apiservers"
)

const validity = 10 * 365 * 24 * time.Hour

// The directories of etcd's and the streams' CAs, under the API CA's.
const (
	EtcdDir    = "etcd"
	StreamsDir = "streams"
)

// CA is the cluster's certificate authority, kept as DIR/ca.crt and ca.key.
type CA struct {
	Dir  string
	Cert *x509.Certificate
	key  crypto.Signer
}

// CertFile is the CA certificate's path.
func (ca *CA) CertFile() string { return filepath.Join(ca.Dir, "ca.crt") }

// LoadOrCreateCA loads the CA in dir, creating it on first use.
func LoadOrCreateCA(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca := &CA{Dir: dir}
	certFile, keyFile := ca.CertFile(), filepath.Join(dir, "ca.key")
	if _, err := os.Stat(certFile); errors.Is(err, os.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		c, err := cert.NewSelfSignedCACert(cert.Config{CommonName: "hearth-ca"}, key)
		if err != nil {
			return nil, fmt.Errorf("make CA: %w", err)
		}
		if err := writePair(certFile, keyFile, c, key); err != nil {
			return nil, err
		}
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	ca.Cert, err = x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("CA key cannot sign")
	}
	ca.key = signer
	return ca, nil
}

// ErrNoCAKey is returned when a certificate must be issued by a CA whose
// key is not on this machine.
var ErrNoCAKey = errors.New("no CA key here to issue certificates")

// LoadCA loads the CA in dir. Unless mustExist, it is created on first use
// (LoadOrCreateCA); else its certificate must be there, and its key may
// not be (a node that joins with credentials issued elsewhere): Ensure then
// only finds certificates, it cannot issue them.
func LoadCA(dir string, mustExist bool) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, "ca.key")); !mustExist || err == nil {
		return LoadOrCreateCA(dir)
	}
	ca := &CA{Dir: dir}
	c, err := loadCert(ca.CertFile())
	if err != nil {
		return nil, fmt.Errorf("no cluster CA certificate in %s: %w", dir, err)
	}
	ca.Cert = c
	return ca, nil
}

// Issuer returns a CA that signs with ca's key into another directory,
// with ca's certificate copied there: the credentials of a node that
// joins from another machine.
func (ca *CA) Issuer(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(ca.CertFile())
	if err != nil {
		return nil, err
	}
	out := &CA{Dir: dir, Cert: ca.Cert, key: ca.key}
	return out, os.WriteFile(out.CertFile(), b, 0o644)
}

// Pool is a cert pool holding the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Pair is a certificate and its key on disk.
type Pair struct{ CertFile, KeyFile string }

// Request says what certificate to issue.
type Request struct {
	Name   string // file name stem under the CA's directory
	CN     string
	Groups []string
	// Serving certificates name their hosts; client certificates none.
	Hosts  []string
	Client bool
	Server bool
}

// Ensure issues the certificate unless a valid one of that name already
// exists with the same subject and hosts.
func (ca *CA) Ensure(req Request) (Pair, error) {
	p := Pair{filepath.Join(ca.Dir, req.Name+".crt"), filepath.Join(ca.Dir, req.Name+".key")}
	if c, err := loadCert(p.CertFile); err == nil && matches(c, req) && c.CheckSignatureFrom(ca.Cert) == nil {
		return p, nil
	}
	if ca.key == nil {
		return p, fmt.Errorf("%s: %w", p.CertFile, ErrNoCAKey)
	}
	key, serial, err := newKey()
	if err != nil {
		return p, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.CN, Organization: req.Groups},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
	if req.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	if req.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	for _, h := range req.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return p, fmt.Errorf("issue %s: %w", req.Name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return p, err
	}
	return p, writePair(p.CertFile, p.KeyFile, c, key)
}

// IssueClient issues a client certificate for cn in groups, valid for ttl
// from now, and returns it and its key PEM-encoded, written nowhere: a
// user's credentials, which go into the kubeconfig handed to them.
func (ca *CA) IssueClient(cn string, groups []string, ttl time.Duration) (certPEM, keyPEM []byte, err error) {
	if ca.key == nil {
		return nil, nil, ErrNoCAKey
	}
	key, serial, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: groups},
		// A minute back, for clocks a little behind; not an hour, so that
		// a short-lived certificate is short-lived.
		NotBefore:   now.Add(-time.Minute),
		NotAfter:    now.Add(ttl),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("issue a certificate for %s: %w", cn, err)
	}
	keyPEM, err = keyutil.MarshalPrivateKeyToPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: cert.CertificateBlockType, Bytes: der}), keyPEM, nil
}

// newKey is a fresh key and a random serial for a certificate of it.
func newKey() (*ecdsa.PrivateKey, *big.Int, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	return key, serial, nil
}

func matches(c *x509.Certificate, req Request) bool {
	if c.Subject.CommonName != req.CN || time.Until(c.NotAfter) < 30*24*time.Hour {
		return false
	}
	if fmt.Sprint(c.Subject.Organization) != fmt.Sprint(req.Groups) {
		return false
	}
	for _, h := range req.Hosts {
		if c.VerifyHostname(h) != nil {
			return false
		}
	}
	// A usage asked for since it was issued (node serving certificates
	// became client ones too, for migrations) means a new one.
	for _, u := range []struct {
		want bool
		eku  x509.ExtKeyUsage
	}{{req.Client, x509.ExtKeyUsageClientAuth}, {req.Server, x509.ExtKeyUsageServerAuth}} {
		if u.want && !slices.Contains(c.ExtKeyUsage, u.eku) {
			return false
		}
	}
	return true
}

func loadCert(path string) (*x509.Certificate, error) {
	certs, err := cert.CertsFromFile(path)
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

func writePair(certFile, keyFile string, c *x509.Certificate, key crypto.Signer) error {
	keyPEM, err := keyutil.MarshalPrivateKeyToPEM(key)
	if err != nil {
		return err
	}
	if err := keyutil.WriteKey(keyFile, keyPEM); err != nil {
		return err
	}
	return cert.WriteCert(certFile, pem.EncodeToMemory(&pem.Block{Type: cert.CertificateBlockType, Bytes: c.Raw}))
}

// SelfSigned is a self-signed serving certificate for hosts (DNS names,
// wildcards too), valid for d, PEM-encoded: the ingress's development
// wildcard, and tests' certificates.
func SelfSigned(hosts []string, d time.Duration) (certPEM, keyPEM []byte, err error) {
	key, serial, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: hosts[0]}, DNSNames: hosts,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(d), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), nil
}

// NodeUserPrefix begins a node agent's name, in its certificates and as
// an API user: hearth-node:HOST.
const NodeUserPrefix = "hearth-node:"

// NodeServingRequest is the certificate a node agent serves streams with,
// and sends a migration's stream to another node agent with (a client).
func NodeServingRequest(name, host string) Request {
	return Request{Name: "node-" + name, CN: NodeUserPrefix + name, Hosts: []string{host}, Server: true, Client: true}
}

// IsNode is a TLS VerifyConnection check: the peer's certificate (already
// verified against the CA) must name node host (hearth-node:HOST), so that
// an agent at another host's address, or answering there, is refused.
func IsNode(host string) func(tls.ConnectionState) error {
	want := NodeUserPrefix + host
	return func(cs tls.ConnectionState) error {
		got := ""
		if len(cs.PeerCertificates) > 0 {
			got = cs.PeerCertificates[0].Subject.CommonName
		}
		if got != want {
			return fmt.Errorf("the node agent at this address is %q, not host %s's (%q)", got, host, want)
		}
		return nil
	}
}

// NodeClientRequest is the certificate a node agent calls the API with.
func NodeClientRequest(name string) Request {
	return Request{Name: "node-" + name + "-client", CN: NodeUserPrefix + name, Groups: []string{GroupNodes}, Client: true}
}
