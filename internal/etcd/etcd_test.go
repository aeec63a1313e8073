package etcd

import (
	"context"
	"crypto/tls"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/testenv"
)

// TestOnlyTheAPIServer: the member serves the client names it is given
// and no other certificate of the same CA (a user's, a node's).
func TestOnlyTheAPIServer(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	serving, err := ca.Ensure(pki.Request{Name: "etcd", CN: memberCN, Hosts: []string{"127.0.0.1"}, Server: true, Client: true})
	if err != nil {
		t.Fatal(err)
	}
	url := "https://" + testenv.FreeAddr(t)
	m, err := Start(context.Background(), slog.New(slog.DiscardHandler), Config{Name: "t", DataDir: filepath.Join(dir, "data"),
		ClientURL: url, PeerURL: "https://" + testenv.FreeAddr(t),
		CertFile: serving.CertFile, KeyFile: serving.KeyFile, CAFile: ca.CertFile(), ClientCNs: []string{"hearth-apiserver"}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	put := func(cn string, groups ...string) error {
		p, err := ca.Ensure(pki.Request{Name: cn, CN: cn, Groups: groups, Client: true})
		if err != nil {
			t.Fatal(err)
		}
		cert, err := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		c, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 2 * time.Second,
			TLS: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool()}})
		if err != nil {
			return err
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err = c.Put(ctx, "/k", cn)
		return err
	}
	if err := put("hearth-apiserver"); err != nil {
		t.Errorf("the API server's certificate: %v", err)
	}
	for _, cn := range []string{"alice", "hearth-node:h1", "hearth-admin"} {
		if err := put(cn, pki.GroupAdmin); err == nil {
			t.Errorf("%s's certificate of the same CA writes to etcd", cn)
		}
	}
}
