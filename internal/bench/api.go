package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/quota"
	"hearth.dev/hearth/internal/sandbox"
)

// APIOptions configure the API benchmark.
type APIOptions struct {
	N           int // sandboxes created, and etcd puts
	Concurrency int
	Rounds      int // the creates alternate between the API servers in this many rounds
	// Boots is how many times one sandbox is timed from create to
	// Running, against the same runtime's local run; 0 skips that part
	// (it needs root, QEMU and the guest kernel).
	Boots   int
	Runtime *sandbox.Runtime
	// KubeAPIServer is the kube-apiserver binary to measure against
	// (KubeAPIServerBinary's rules; "none" skips it).
	KubeAPIServer string
	WorkDir       string
	Out           io.Writer
	Log           *slog.Logger
}

// APIResult is what the API benchmark measured.
type APIResult struct {
	N              int     `json:"n"`
	Concurrency    int     `json:"concurrency"`
	ObjectBytes    int     `json:"object_bytes"`
	CreatesPerSec  float64 `json:"creates_per_sec"`
	EtcdPutsPerSec float64 `json:"etcd_puts_per_sec"`
	RatioToEtcd    float64 `json:"ratio_to_etcd"`
	// kube-apiserver v1.37 serving hearth's CRDs on an etcd of its own,
	// under the same load in the same run; zero where it is not built.
	// The same creates by a tenant (a user bound to the edit role in a
	// namespace with a ResourceQuota), whose every request RBAC authorizes
	// and quota admission charges, against the admin's above
	// (system:masters, allowed before RBAC is asked, in a namespace
	// without a quota).
	TenantCreatesPerSec float64 `json:"tenant_creates_per_sec"`
	KubeCreatesPerSec   float64 `json:"kube_apiserver_creates_per_sec,omitempty"`
	// kube-apiserver's creates under the same quota (by the admin: its
	// quota admission, not RBAC, is what they pay for).
	KubeQuotaCreatesPerSec float64 `json:"kube_apiserver_quota_creates_per_sec,omitempty"`
	KubeNote               string  `json:"kube_apiserver,omitempty"`
	Boots                  int     `json:"boots,omitempty"`
	APIRunningP50ms        float64 `json:"api_create_to_running_p50_ms,omitempty"`
	LocalRunningP50        float64 `json:"local_run_to_running_p50_ms,omitempty"`
	ControlPlaneAdds       float64 `json:"control_plane_adds_ms,omitempty"`
}

// Summary is the result in the benchmarks' common shape: creates per
// second against kube-apiserver's for the same CRDs where it was measured,
// and against raw etcd puts.
func (r *APIResult) Summary() *Result {
	res := &Result{Bench: "api", N: r.N, Details: r}
	etcd := NewFigure("creates_per_sec", r.CreatesPerSec, "etcd_puts_per_sec", r.EtcdPutsPerSec, Higher, 0)
	if r.KubeCreatesPerSec > 0 {
		res.Figure = NewFigure("creates_per_sec", r.CreatesPerSec, "kube_apiserver_creates_per_sec", r.KubeCreatesPerSec, Higher, 1)
		res.More = append(res.More, etcd)
	} else {
		res.Figure = etcd
	}
	res.More = append(res.More, NewFigure("tenant_creates_per_sec", r.TenantCreatesPerSec, "creates_per_sec", r.CreatesPerSec, Higher, 0.9))
	if r.KubeQuotaCreatesPerSec > 0 {
		res.More = append(res.More, NewFigure("tenant_creates_per_sec", r.TenantCreatesPerSec, "kube_apiserver_quota_creates_per_sec", r.KubeQuotaCreatesPerSec, Higher, 1))
	}
	if r.Boots > 0 {
		res.More = append(res.More, NewFigure("api_create_to_running_p50_ms", r.APIRunningP50ms, "local_run_to_running_p50_ms", r.LocalRunningP50, Lower, 0))
	}
	return res
}

// API starts an all-in-one hearth in this process and measures it: Sandbox
// creates per second through the API server (with a hostSelector no host
// matches, so nothing boots) against the same creates through kube-apiserver
// serving the same CRDs (where it is built) and against raw puts of objects
// of the same size to the same etcd, in the same run; then, with Boots > 0,
// the time from create to Running of one sandbox against a local run of the
// same image.
func API(ctx context.Context, o APIOptions) (*APIResult, error) {
	if o.Concurrency == 0 {
		o.Concurrency = 32
	}
	res := &APIResult{N: o.N, Concurrency: o.Concurrency}
	cp, err := startHearth(ctx, o.Log, o.WorkDir, func(opts *hearthd.Options) {
		if o.Boots > 0 {
			opts.Roles = append(opts.Roles, hearthd.RoleNode)
			// The benchmark's --accel chose; TCG is fine for a measurement.
			opts.Node.Name, opts.Node.Accel, opts.Node.AllowTCG = "bench", string(o.Runtime.Accel), true
			opts.Node.MaxSandboxes, opts.Node.LogMaxBytes = 10, 1<<20
		}
	})
	if err != nil {
		return nil, err
	}
	defer cp.stop()
	c, dataDir := cp.client, cp.dataDir
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}); err != nil {
		return nil, err
	}

	// Creates through hearth's API server and, where it is built, the
	// same creates through a stock kube-apiserver serving the same CRDs on
	// an etcd of its own: in alternating rounds, so that this shared
	// machine's drift spreads over both.
	tenant, err := tenantClient(ctx, cp, tenantNamespace)
	if err != nil {
		return nil, err
	}
	targets := []createTarget{{name: "hearth", c: c, ns: "bench"}, {name: "hearth as a tenant (RBAC and a quota)", c: tenant, ns: tenantNamespace}}
	if bin, why := KubeAPIServerBinary(o.KubeAPIServer); bin == "" {
		res.KubeNote = why
		fmt.Fprintf(o.Out, "kube-apiserver: %s\n", why)
	} else {
		k, err := startKubeAPIServer(ctx, o.Log, bin, filepath.Join(o.WorkDir, "kube"))
		if err != nil {
			return nil, fmt.Errorf("kube-apiserver: %w", err)
		}
		defer k.stop()
		if err := k.client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}); err != nil {
			return nil, err
		}
		targets = append(targets, createTarget{name: "kube-apiserver " + KubeAPIServerVersion, c: k.client, ns: "bench"})
		// And under the same quota: kube-apiserver's ResourceQuota
		// admission charges each create as hearth's does (no controller
		// runs there to count: the status starts at zero, as it is).
		q := benchQuota(tenantNamespace)
		if err := k.client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: tenantNamespace}}); err != nil {
			return nil, err
		}
		if err := k.client.Create(ctx, q); err != nil {
			return nil, err
		}
		q.Status = quota.Status(q.Spec.Hard, quota.Used(quota.Objects{}))
		if err := k.client.Status().Update(ctx, q); err != nil {
			return nil, fmt.Errorf("kube-apiserver's quota status: %w", err)
		}
		targets = append(targets, createTarget{name: "kube-apiserver " + KubeAPIServerVersion + " under a quota", c: k.client, ns: tenantNamespace})
		res.KubeNote = KubeAPIServerVersion
	}
	rounds := max(min(o.Rounds, o.N), 1)
	for r := range rounds {
		from, to := o.N*r/rounds, o.N*(r+1)/rounds
		for i := range targets {
			t := &targets[i]
			d, err := parallel(ctx, to-from, o.Concurrency, func(j int) error {
				sb := benchSandbox(from + j)
				sb.Namespace = t.ns
				return t.c.Create(ctx, sb)
			})
			if err != nil {
				return nil, fmt.Errorf("%s: create sandboxes: %w", t.name, err)
			}
			t.took += d
			fmt.Fprintf(o.Out, "round %d: %s: %d sandbox creates with %d clients: %.0f/s\n", r+1, t.name, to-from, o.Concurrency, float64(to-from)/d.Seconds())
		}
	}
	res.CreatesPerSec = round(float64(o.N)/targets[0].took.Seconds(), 0)
	fmt.Fprintf(o.Out, "hearth's API server: %d sandbox creates in %s with %d clients: %.0f/s\n", o.N, targets[0].took.Round(time.Millisecond), o.Concurrency, res.CreatesPerSec)
	res.TenantCreatesPerSec = round(float64(o.N)/targets[1].took.Seconds(), 0)
	fmt.Fprintf(o.Out, "the same creates by a tenant, authorized by RBAC and charged to a quota: %.0f/s, %.0f%% of the admin's\n", res.TenantCreatesPerSec, 100*res.TenantCreatesPerSec/res.CreatesPerSec)
	if len(targets) > 2 {
		res.KubeCreatesPerSec = round(float64(o.N)/targets[2].took.Seconds(), 0)
		fmt.Fprintf(o.Out, "%s, same CRDs: %.0f/s; hearth's are %.0f%% of it\n", targets[2].name, res.KubeCreatesPerSec, 100*res.CreatesPerSec/res.KubeCreatesPerSec)
		res.KubeQuotaCreatesPerSec = round(float64(o.N)/targets[3].took.Seconds(), 0)
		fmt.Fprintf(o.Out, "%s: %.0f/s, %.0f%% of its own without; hearth's tenant under a quota is %.0f%% of it\n", targets[3].name,
			res.KubeQuotaCreatesPerSec, 100*res.KubeQuotaCreatesPerSec/res.KubeCreatesPerSec, 100*res.TenantCreatesPerSec/res.KubeQuotaCreatesPerSec)
	}

	// Raw puts of objects of the same size to the same etcd.
	etcd, err := etcdClient(dataDir, cp.etcdPort)
	if err != nil {
		return nil, err
	}
	defer etcd.Close()
	got, err := etcd.Get(ctx, "/registry/hearth.dev/sandboxes/bench/bench-0")
	if err != nil || len(got.Kvs) == 0 {
		return nil, fmt.Errorf("read a stored sandbox from etcd: %v", err)
	}
	res.ObjectBytes = len(got.Kvs[0].Value)
	value := string(got.Kvs[0].Value)
	d, err := parallel(ctx, o.N, o.Concurrency, func(i int) error {
		_, err := etcd.Put(ctx, "/bench/raw/"+strconv.Itoa(i), value)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("etcd puts: %w", err)
	}
	res.EtcdPutsPerSec = round(float64(o.N)/d.Seconds(), 0)
	res.RatioToEtcd = round(res.CreatesPerSec/res.EtcdPutsPerSec, 3)
	fmt.Fprintf(o.Out, "etcd: %d puts of %d bytes with %d clients: %.0f/s; API creates are %.0f%% of it\n",
		o.N, res.ObjectBytes, o.Concurrency, res.EtcdPutsPerSec, 100*res.RatioToEtcd)

	if o.Boots > 0 {
		// One sandbox on an otherwise idle control plane.
		for _, ns := range []string{"bench", tenantNamespace} {
			if err := c.DeleteAllOf(ctx, &v1alpha1.Sandbox{}, client.InNamespace(ns), client.MatchingLabels{"bench": "api"}); err != nil {
				return nil, err
			}
		}
		for {
			var left v1alpha1.SandboxList
			if err := c.List(ctx, &left, client.MatchingLabels{"bench": "api"}); err != nil {
				return nil, err
			}
			if len(left.Items) == 0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := timeBoots(ctx, o, c, res); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// tenantNamespace is where the benchmark's tenant creates, under a quota.
const tenantNamespace = "bench-tenant"

// benchQuota bounds sandboxes, CPU and memory in ns far above what the
// benchmark makes: every create is charged to it, and none refused.
func benchQuota(ns string) *corev1.ResourceQuota {
	return &corev1.ResourceQuota{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bench"},
		Spec: corev1.ResourceQuotaSpec{Hard: corev1.ResourceList{
			quota.Sandboxes: resource.MustParse("1000000"), quota.CPU: resource.MustParse("1000000"), quota.Memory: resource.MustParse("1Pi")}}}
}

// tenantClient is a client of a user bound to the edit role in ns, as
// `hearth user create --role edit` makes one, where a ResourceQuota
// bounds sandboxes, CPU and memory (far above what the benchmark makes:
// every create is charged to it, and none refused).
func tenantClient(ctx context.Context, cp *hearth, ns string) (client.Client, error) {
	if err := cp.client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		return nil, err
	}
	q := benchQuota(ns)
	if err := cp.client.Create(ctx, q); err != nil {
		return nil, fmt.Errorf("the benchmark's quota: %w", err)
	}
	ca, err := pki.LoadCA(filepath.Join(cp.dataDir, "pki"), true)
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := ca.IssueClient("bench-tenant", nil, time.Hour)
	if err != nil {
		return nil, err
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bench-tenant"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "edit"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "bench-tenant"}},
	}
	if err := cp.client.Create(ctx, binding); err != nil {
		return nil, fmt.Errorf("bind the benchmark's tenant: %w", err)
	}
	cfg := rest.CopyConfig(cp.cfg)
	cfg.CertFile, cfg.KeyFile = "", ""
	cfg.CertData, cfg.KeyData = certPEM, keyPEM
	c, err := client.New(cfg, client.Options{Scheme: hearthd.Scheme})
	if err != nil {
		return nil, err
	}
	// The authorizer's informers see the binding within moments, and the
	// quota controller counts the namespace.
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		var l v1alpha1.SandboxList
		err := c.List(ctx, &l, client.InNamespace(ns), client.Limit(1))
		if err == nil {
			err = cp.client.Get(ctx, client.ObjectKeyFromObject(q), q)
		}
		if err == nil && len(q.Status.Used) == len(q.Spec.Hard) {
			return c, nil
		}
		if err == nil {
			err = errors.New("the quota is not counted")
		}
		if time.Since(start) > 10*time.Second {
			return nil, fmt.Errorf("the benchmark's tenant cannot list sandboxes: %w", err)
		}
	}
}

// createTarget is an API server the creates are timed against, and the
// namespace they go to.
type createTarget struct {
	name string
	c    client.Client
	ns   string
	took time.Duration
}

func benchSandbox(i int) *v1alpha1.Sandbox {
	return &v1alpha1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "bench-" + strconv.Itoa(i), Labels: map[string]string{"bench": "api"}},
		Spec: v1alpha1.SandboxSpec{
			Image:        "registry.example/tools:1",
			Command:      []string{"sh", "-c", "echo hello"},
			HostSelector: map[string]string{"bench": "no-such-host"},
		},
	}
}

// parallel runs f(0..n-1) on workers and returns how long it took.
func parallel(ctx context.Context, n, workers int, f func(int) error) (time.Duration, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	d := time.Since(start)
	select {
	case err := <-errs:
		return 0, err
	default:
	}
	return d, nil
}

func etcdClient(dataDir string, port int) (*clientv3.Client, error) {
	dir := filepath.Join(dataDir, "pki", pki.EtcdDir)
	ca, err := pki.LoadOrCreateCA(dir)
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "apiserver-etcd-client.crt"), filepath.Join(dir, "apiserver-etcd-client.key"))
	if err != nil {
		return nil, err
	}
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{"https://127.0.0.1:" + strconv.Itoa(port)},
		DialTimeout: 5 * time.Second,
		TLS:         &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12},
		Logger:      nil,
	})
}

// timeBoots times one sandbox from create to Running through the API,
// interleaved with local runs of the same image to the workload's start.
func timeBoots(ctx context.Context, o APIOptions, c client.WithWatch, res *APIResult) error {
	layout := filepath.Join(o.WorkDir, "image")
	base, err := imagebuild.Busybox()
	if err != nil {
		return err
	}
	img, err := imagebuild.Image(v1.Config{Cmd: []string{"sleep", "1000"}}, base)
	if err != nil {
		return err
	}
	if err := imagebuild.WriteLayout(layout, "bench", img); err != nil {
		return err
	}
	ref := "oci:" + layout + ":bench"
	spec := sandbox.Spec{Image: ref, CPUs: 1, MemoryMiB: 256, DiskMiB: 1024}
	local := func() (time.Duration, error) {
		rctx, stop := context.WithCancel(ctx)
		defer stop()
		start := time.Now()
		var took time.Duration
		_, err := o.Runtime.Run(rctx, spec, sandbox.IO{Stdout: io.Discard, Stderr: io.Discard, Started: func() {
			took = time.Since(start)
			stop()
		}})
		if took == 0 {
			return 0, fmt.Errorf("local run: %w", err)
		}
		return took, nil
	}
	if _, err := local(); err != nil { // converts the image once
		return err
	}
	var viaAPI, viaLocal, added []time.Duration
	for i := range o.Boots {
		l, err := local()
		if err != nil {
			return err
		}
		sb := &v1alpha1.Sandbox{
			ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "boot-" + strconv.Itoa(i)},
			Spec:       v1alpha1.SandboxSpec{Image: ref},
		}
		sb, created, err := createRunning(ctx, c, sb, 5*time.Minute)
		if err != nil {
			return err
		}
		a := time.Since(created)
		if err := c.Delete(ctx, sb); err != nil {
			return err
		}
		// The runtime's own part of this run (image, disk, boot) is in
		// its status: the rest is the control plane's.
		own := time.Duration(sb.Status.BootMillis) * time.Millisecond
		viaAPI, viaLocal, added = append(viaAPI, a), append(viaLocal, l), append(added, a-own)
		fmt.Fprintf(o.Out, "boot %d: create to Running through the API %4.0f ms (runtime %4.0f ms of it)   local run to running %4.0f ms\n",
			i+1, ms(a), ms(own), ms(l))
	}
	res.Boots = o.Boots
	res.APIRunningP50ms, res.LocalRunningP50 = pct(viaAPI, 50), pct(viaLocal, 50)
	res.ControlPlaneAdds = pct(added, 50)
	fmt.Fprintf(o.Out, "create to Running: p50 %.0f ms through the API, %.0f ms locally (ratio %.2f); the control plane's own part: p50 %.0f ms\n",
		res.APIRunningP50ms, res.LocalRunningP50, res.APIRunningP50ms/res.LocalRunningP50, res.ControlPlaneAdds)
	return nil
}
