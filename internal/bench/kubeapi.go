package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/internal/apiserver"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/etcd"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/pki"
)

// KubeAPIServerVersion is the kube-apiserver the API benchmark measures
// against: that of the k8s.io libraries hearth is built with.
const KubeAPIServerVersion = "v1.37.2"

// KubeAPIServerBinary finds the kube-apiserver to measure against: flag,
// else $HEARTH_KUBE_APISERVER, else where scripts/kube-apiserver.sh caches
// its build. "" with the reason where there is none.
func KubeAPIServerBinary(flag string) (path, why string) {
	for _, p := range []string{flag, os.Getenv("HEARTH_KUBE_APISERVER"),
		filepath.Join(config.CacheDir(), "kube-apiserver", KubeAPIServerVersion, "kube-apiserver")} {
		if p == "none" {
			return "", "skipped (--kube-apiserver none)"
		}
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Sprintf("not measured: %v (build it with scripts/kube-apiserver.sh)", err)
		}
		return p, ""
	}
	return "", "not measured: no kube-apiserver (build it with scripts/kube-apiserver.sh)"
}

// kubeAPIServer is a stock kube-apiserver serving hearth's CRDs on an etcd
// member of its own, configured as hearth's is: TLS to etcd with a client
// certificate, client certificates for users, the admin in system:masters.
type kubeAPIServer struct {
	client client.Client
	stop   func()
}

func startKubeAPIServer(ctx context.Context, log *slog.Logger, bin, dir string) (_ *kubeAPIServer, err error) {
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		return nil, err
	}
	var pairs [4]pki.Pair
	for i, r := range []pki.Request{
		{Name: "etcd", CN: "etcd", Hosts: []string{"127.0.0.1", "localhost"}, Server: true, Client: true},
		{Name: "apiserver-etcd-client", CN: "kube-apiserver", Client: true},
		{Name: "apiserver", CN: "kube-apiserver", Hosts: []string{"127.0.0.1", "localhost"}, Server: true},
		{Name: "admin", CN: "bench-admin", Groups: []string{pki.GroupAdmin}, Client: true},
	} {
		if pairs[i], err = ca.Ensure(r); err != nil {
			return nil, err
		}
	}
	etcdServing, etcdClient, serving, admin := pairs[0], pairs[1], pairs[2], pairs[3]
	saKey := filepath.Join(dir, "pki", "sa.key")
	if err := writeECKey(saKey); err != nil {
		return nil, err
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := "https://127.0.0.1:" + strconv.Itoa(ports[0])
	member, err := etcd.Start(ctx, log, etcd.Config{Name: "kube", DataDir: filepath.Join(dir, "etcd"),
		ClientURL: etcdURL, PeerURL: "https://127.0.0.1:" + strconv.Itoa(ports[1]),
		CertFile: etcdServing.CertFile, KeyFile: etcdServing.KeyFile, CAFile: ca.CertFile(), ClientCNs: []string{"kube-apiserver"}})
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "kube-apiserver.log"))
	if err != nil {
		member.Close()
		return nil, err
	}
	cmd := exec.Command(bin,
		"--etcd-servers="+etcdURL, "--etcd-cafile="+ca.CertFile(),
		"--etcd-certfile="+etcdClient.CertFile, "--etcd-keyfile="+etcdClient.KeyFile,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(ports[2]),
		"--tls-cert-file="+serving.CertFile, "--tls-private-key-file="+serving.KeyFile,
		"--client-ca-file="+ca.CertFile(), "--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc", "--service-account-key-file="+saKey,
		"--service-account-signing-key-file="+saKey, "--service-cluster-ip-range=10.96.0.0/24",
		"--cert-dir="+filepath.Join(dir, "certs"), "--profiling=false",
		// No Service for the API server itself: it would need an address
		// that is not loopback.
		"--endpoint-reconciler-type=none")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Gone with this process, however it ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		member.Close()
		logFile.Close()
		return nil, fmt.Errorf("kube-apiserver: %w", err)
	}
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	k := &kubeAPIServer{stop: func() {
		_ = cmd.Process.Kill()
		<-exited
		member.Close()
		logFile.Close()
	}}
	defer func() {
		if err != nil {
			k.stop()
			if b, rerr := os.ReadFile(logFile.Name()); rerr == nil {
				err = fmt.Errorf("%w\nkube-apiserver's log ends:\n%s", err, tail(b, 2048))
			}
		}
	}()
	cfg := &rest.Config{Host: "https://127.0.0.1:" + strconv.Itoa(ports[2]), QPS: -1,
		TLSClientConfig: rest.TLSClientConfig{CAFile: ca.CertFile(), CertFile: admin.CertFile, KeyFile: admin.KeyFile}}
	if err := waitReady(ctx, cfg, exited, func() error { return waitErr }); err != nil {
		return nil, err
	}
	if err := apiserver.InstallCRDs(ctx, cfg, log); err != nil {
		return nil, err
	}
	if k.client, err = client.New(cfg, client.Options{Scheme: hearthd.Scheme}); err != nil {
		return nil, err
	}
	return k, nil
}

// waitReady polls /readyz until the server answers ok, for two minutes.
func waitReady(ctx context.Context, cfg *rest.Config, exited <-chan struct{}, waitErr func() error) error {
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Host+"/readyz", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readyz: %s: %s", resp.Status, body)
		}
		select {
		case <-exited:
			return fmt.Errorf("kube-apiserver exited: %v", waitErr())
		case <-ctx.Done():
			return errors.Join(fmt.Errorf("kube-apiserver not ready: %w", ctx.Err()), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func writeECKey(path string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
