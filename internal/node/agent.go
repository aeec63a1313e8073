// Package node is the node agent: it registers its Host, heartbeats through
// a Lease, watches the Sandboxes bound to it and drives each through a shim
// (internal/shim) that runs its VM, writing status as the run goes. Every
// step is idempotent and derived from what is on disk (the sandbox's run
// directories) and in the API, so that a restarted agent adopts the VMs
// still running, neither killing nor duplicating them, and removes what
// belongs to sandboxes that no longer exist. It also serves the sandboxes'
// streams (logs, exec, attach) to the API server over TLS (streams.go).
package node

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

// Config is one node agent.
type Config struct {
	Name   string
	Labels map[string]string
	// Zone is the host's failure domain (the topology.hearth.dev/zone
	// label); empty: none.
	Zone string
	// Heartbeat is how often the Lease is renewed (10 s unless set).
	Heartbeat time.Duration
	// Images is the image store the shims convert into; the host reports
	// what it holds, for the scheduler's image locality.
	Images *image.Store
	// StateDir holds one directory per sandbox (its runs and logs).
	StateDir string
	// VMDir holds the run directory of each VM (writable disk, memory
	// file, sockets), on a real filesystem: disks and memory files are
	// reserved when made, and its free space plus what they hold is the
	// host's allocatable disk. Empty: StateDir/../vms.
	VMDir string
	// SnapshotDir is the host's snapshot store (one directory per
	// Snapshot); TemplateDir holds its snapshots of templates.
	SnapshotDir, TemplateDir string
	// Listen is where the stream server listens; Address is how the API
	// server reaches it (host:port).
	Listen, Address string
	// Capacity overrides; zero values are measured from the machine.
	CPU, Memory  resource.Quantity
	MaxSandboxes int
	Accel        vmm.Accel
	// InsecureRegistries are reached over plain HTTP by image pulls;
	// PrivateRegistries (and they) are the only registries on loopback,
	// private or link-local addresses that sandboxes' pulls reach.
	InsecureRegistries, PrivateRegistries []string
	// Shim is the hearth-shim binary that supervises each run; Host is
	// what it runs VMs with (its RunRoot is VMDir's, set here).
	Shim string
	Host sandbox.Host
	// CA checks the API server's client certificate; Serving is the
	// stream server's certificate.
	CA      *pki.CA
	Serving pki.Pair
	// Network gives sandboxes a network (internal/network); without it
	// their interface is connected to nothing. ClusterCIDR is the
	// cluster's sandbox range: what leaves it is NAT'ed.
	Network     bool
	ClusterCIDR netip.Prefix
	// IsolateNamespaces: sandboxes of different namespaces reach each
	// other only where a NetworkPolicy allows it (policy.Cluster).
	IsolateNamespaces bool
	// LogMax caps one run's log (rotated once: twice this is kept).
	LogMax  int64
	Version string
	Log     *slog.Logger
	Scheme  *kruntime.Scheme
	Logr    logr.Logger
}

// Agent is a running node agent.
type Agent struct {
	cfg      Config
	client   client.Client
	reader   client.Reader // uncached
	recorder record.EventRecorder
	log      *slog.Logger
	wake     chan event.GenericEvent
	watches  *watches
	// gcNow asks for a garbage collection pass now: a sandbox left this
	// host (deleted, or moved elsewhere).
	gcNow chan struct{}
	// reportNow asks the heartbeat to report what the host holds now.
	reportNow chan struct{}
	// reported is what the Host's status last said the host holds.
	reported  artifacts
	snapMu    sync.Mutex // one snapshot at a time
	templates *templates
	net       *hostNetwork
	// server is the API server's address, which sandboxes never reach.
	server string
	// moves are the migrations under way to or from this host; ctx is
	// the agent's life, which the sending of one lasts at most.
	moves *moves
	ctx   context.Context
}

// artifacts are what a host holds that makes starting sandboxes cheaper
// there: the scheduler's locality input.
type artifacts struct{ images, snapshots, templates []string }

func (x artifacts) equal(y artifacts) bool {
	return slices.Equal(x.images, y.images) && slices.Equal(x.snapshots, y.snapshots) && slices.Equal(x.templates, y.templates)
}

// checkVMDir refuses a VM directory that others could change (its VMs'
// disks and sockets: nobody else may swap them), and warns of a tmpfs.
func checkVMDir(dir string, log *slog.Logger) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("the VM directory: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != os.Geteuid() || st.Mode&0o022 != 0 {
		return fmt.Errorf("the VM directory %s (hearthd --vm-dir): want a directory owned by uid %d that no one else may write (it is uid %d, mode %o)",
			dir, os.Geteuid(), st.Uid, st.Mode&0o7777)
	}
	var fs unix.Statfs_t
	if unix.Statfs(dir, &fs) == nil && fs.Type == unix.TMPFS_MAGIC {
		log.Warn("the VM directory is a tmpfs: the disks reserved there take RAM, and it fills before the host's memory does", "dir", dir)
	}
	return nil
}

// Run runs the agent until ctx ends.
func Run(ctx context.Context, restCfg *rest.Config, cfg Config) error {
	if cfg.LogMax == 0 {
		cfg.LogMax = 10 << 20
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = 10 * time.Second
	}
	if cfg.VMDir == "" {
		cfg.VMDir = filepath.Join(filepath.Dir(cfg.StateDir), "vms")
	}
	for _, d := range []string{cfg.StateDir, cfg.VMDir, cfg.SnapshotDir, cfg.TemplateDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	cfg.Host.RunRoot = cfg.VMDir
	if err := checkVMDir(cfg.VMDir, cfg.Log); err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(restCfg, ctrl.Options{
		Scheme:                 cfg.Scheme,
		Logger:                 cfg.Logr,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		// Several node agents may run in one process, one after another
		// (the benchmarks): controller names are unique per manager.
		Controller: crconfig.Controller{SkipNameValidation: ptr.To(true)},
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			// Only this host's sandboxes: the API server filters by the
			// CRD's selectable field.
			&v1alpha1.Sandbox{}: {Field: fields.OneTermEqualSelector("status.hostName", cfg.Name)},
		}},
	})
	if err != nil {
		return err
	}
	a := &Agent{
		cfg:       cfg,
		client:    mgr.GetClient(),
		reader:    mgr.GetAPIReader(),
		recorder:  mgr.GetEventRecorderFor("hearth-node/" + cfg.Name),
		log:       cfg.Log.With("host", cfg.Name),
		wake:      make(chan event.GenericEvent, 256),
		gcNow:     make(chan struct{}, 1),
		reportNow: make(chan struct{}, 1),
		moves:     newMoves(),
		ctx:       ctx,
	}
	a.templates = &templates{a: a, ctx: ctx, builds: map[string]*templateBuild{}, running: map[string]bool{}}
	a.server = restCfg.Host
	// Policies select peers anywhere: the network keeps a cache of every
	// sandbox, policy, namespace and host of the cluster.
	all, err := cache.New(restCfg, cache.Options{Scheme: cfg.Scheme})
	if err != nil {
		return err
	}
	if err := mgr.Add(all); err != nil {
		return err
	}
	a.net = newHostNetwork(a, all, cfg.ClusterCIDR, cfg.Network, cfg.IsolateNamespaces)
	a.watches = newWatches(a.wake)
	// The Host first, so that the scheduler can place work as soon as
	// possible; with a direct client, as the cache is not started yet.
	direct, err := client.New(restCfg, client.Options{Scheme: cfg.Scheme})
	if err != nil {
		return err
	}
	// The host lifecycle controller may write the Host's status meanwhile.
	if err := retry.RetryOnConflict(retry.DefaultBackoff, func() error { return a.register(ctx, direct) }); err != nil {
		return fmt.Errorf("register host %s: %w", cfg.Name, err)
	}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("node").
		For(&v1alpha1.Sandbox{}).
		WatchesRawSource(source.Channel(a.wake, &handler.EnqueueRequestForObject{})).
		WithOptions(controllerOptions()).
		Complete(a); err != nil {
		return err
	}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("snapshots").
		For(&v1alpha1.Snapshot{}).
		Complete(snapshotReconciler{a}); err != nil {
		return err
	}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("migrations").
		For(&v1alpha1.Migration{}).
		Complete(migrationReconciler{a}); err != nil {
		return err
	}
	for _, r := range []manager.RunnableFunc{
		func(ctx context.Context) error { return a.heartbeat(ctx, direct) },
		a.collectGarbage,
		a.serveStreams,
		a.net.run,
	} {
		if err := mgr.Add(r); err != nil {
			return err
		}
	}
	a.log.Info("node agent running", "state", cfg.StateDir, "streams", cfg.Address, "accel", cfg.Accel)
	err = mgr.Start(ctx)
	a.watches.stopAll()
	a.templates.wg.Wait()
	return err
}

// capacity measures the machine unless told.
func (a *Agent) capacity() corev1.ResourceList {
	cpu, mem := a.cfg.CPU, a.cfg.Memory
	if cpu.IsZero() {
		cpu = *resource.NewQuantity(int64(runtime.NumCPU()), resource.DecimalSI)
	}
	if mem.IsZero() {
		var si unix.Sysinfo_t
		if unix.Sysinfo(&si) == nil {
			mem = *resource.NewQuantity(int64(si.Totalram)*int64(si.Unit), resource.BinarySI)
		}
	}
	var disk resource.Quantity
	var fs unix.Statfs_t
	if unix.Statfs(a.cfg.VMDir, &fs) == nil {
		// What is free, and what the VMs' disks hold already: their
		// requests are what the scheduler counts against it.
		disk = *resource.NewQuantity(int64(fs.Bavail)*fs.Bsize+sandbox.DiskUsage(a.cfg.VMDir), resource.BinarySI)
	}
	max := a.cfg.MaxSandboxes
	if max == 0 {
		max = 100
	}
	return corev1.ResourceList{
		corev1.ResourceCPU:         cpu,
		corev1.ResourceMemory:      mem,
		corev1.ResourceStorage:     disk,
		v1alpha1.ResourceSandboxes: *resource.NewQuantity(int64(max), resource.DecimalSI),
	}
}

// labels are the host's: the configured ones and the well-known hostname
// and zone labels.
func (a *Agent) labels() map[string]string {
	l := map[string]string{v1alpha1.LabelHostname: a.cfg.Name}
	if a.cfg.Zone != "" {
		l[v1alpha1.LabelZone] = a.cfg.Zone
	}
	for k, v := range a.cfg.Labels {
		l[k] = v
	}
	return l
}

// register creates or updates the Host with what this machine has. The
// spec (cordon, taints, overcommit) is the operator's and left alone.
func (a *Agent) register(ctx context.Context, c client.Client) error {
	var h v1alpha1.Host
	err := c.Get(ctx, types.NamespacedName{Name: a.cfg.Name}, &h)
	if apierrors.IsNotFound(err) {
		h = v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: a.cfg.Name, Labels: a.labels()}}
		if err := c.Create(ctx, &h); err != nil {
			return err
		}
	} else if err != nil {
		return err
	} else {
		changed := false
		for k, v := range a.labels() {
			if h.Labels[k] != v {
				if h.Labels == nil {
					h.Labels = map[string]string{}
				}
				h.Labels[k], changed = v, true
			}
		}
		if changed {
			if err := c.Update(ctx, &h); err != nil {
				return err
			}
		}
	}
	capacity := a.capacity()
	h.Status.Capacity, h.Status.Allocatable = capacity, capacity
	h.Status.Accel, h.Status.Address, h.Status.Version = string(a.cfg.Accel), a.cfg.Address, a.cfg.Version
	a.reported = a.held()
	h.Status.Images, h.Status.Snapshots, h.Status.Templates = a.reported.images, a.reported.snapshots, a.reported.templates
	msg := "the node agent is running"
	if a.cfg.Accel == vmm.TCG {
		msg += "; guests run under TCG software emulation, which is not a security boundary"
	}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{
		Type: v1alpha1.HostConditionReady, Status: metav1.ConditionTrue, Reason: "AgentReady", Message: msg,
	})
	// The lease first: a host that comes back Ready with a stale lease
	// would be marked NotReady again until its first heartbeat.
	if err := a.renew(ctx, c); err != nil {
		return err
	}
	return c.Status().Update(ctx, &h)
}

// heartbeat renews the host's Lease every Heartbeat (10 s, as the
// kubelet does), and reports what the host holds when it changes: at
// once when asked (reportSoon), else with the heartbeat.
func (a *Agent) heartbeat(ctx context.Context, c client.Client) error {
	next := time.Now()
	for {
		if !time.Now().Before(next) {
			if err := a.renew(ctx, c); err != nil && ctx.Err() == nil {
				a.log.Warn("renew host lease", "err", err)
			}
			next = time.Now().Add(a.cfg.Heartbeat)
		}
		if err := a.reportArtifacts(ctx, c); err != nil && ctx.Err() == nil {
			a.log.Warn("report images and snapshots", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Until(next)):
		case <-a.reportNow:
		}
	}
}

// reportSoon asks for the host's artifacts to be reported now.
func (a *Agent) reportSoon() {
	select {
	case a.reportNow <- struct{}{}:
	default:
	}
}

// heldImages lists the image references in the host's store, sorted.
func (a *Agent) heldImages() []string {
	if a.cfg.Images == nil {
		return nil
	}
	entries, err := a.cfg.Images.List()
	if err != nil {
		a.log.Warn("list images", "err", err)
		return a.reported.images
	}
	refs := make([]string, 0, len(entries))
	for _, e := range entries {
		refs = append(refs, e.Ref)
	}
	sort.Strings(refs)
	return refs
}

// held is what the host holds now.
func (a *Agent) held() artifacts {
	return artifacts{images: a.heldImages(), snapshots: a.heldSnapshots(), templates: a.templates.held()}
}

func (a *Agent) reportArtifacts(ctx context.Context, c client.Client) error {
	held := a.held()
	if held.equal(a.reported) {
		return nil
	}
	var h v1alpha1.Host
	if err := c.Get(ctx, types.NamespacedName{Name: a.cfg.Name}, &h); err != nil {
		return err
	}
	patch := client.MergeFrom(h.DeepCopy())
	h.Status.Images, h.Status.Snapshots, h.Status.Templates = held.images, held.snapshots, held.templates
	if err := c.Status().Patch(ctx, &h, patch); err != nil {
		return err
	}
	a.reported = held
	return nil
}

func (a *Agent) renew(ctx context.Context, c client.Client) error {
	return RenewLease(ctx, c, a.cfg.Name, a.cfg.Heartbeat)
}

// RenewLease renews, creating it the first time, the heartbeat Lease of
// host, renewed every interval (it lasts four of them).
func RenewLease(ctx context.Context, c client.Client, host string, interval time.Duration) error {
	now := metav1.NowMicro()
	var l coordinationv1.Lease
	err := c.Get(ctx, types.NamespacedName{Namespace: v1alpha1.LeaseNamespace, Name: host}, &l)
	if apierrors.IsNotFound(err) {
		l = coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: v1alpha1.LeaseNamespace, Name: host},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(host), LeaseDurationSeconds: ptr.To(int32(4 * interval / time.Second)),
				AcquireTime: &now, RenewTime: &now},
		}
		return c.Create(ctx, &l)
	}
	if err != nil {
		return err
	}
	l.Spec.RenewTime = &now
	return c.Update(ctx, &l)
}

// sandboxDir is where everything of one sandbox lives on this host.
func (a *Agent) sandboxDir(uid types.UID) string {
	return filepath.Join(a.cfg.StateDir, string(uid))
}

// controlPlaneAddr is the API server's IP address, if the agent reaches
// it by one.
func (a *Agent) controlPlaneAddr() (netip.Addr, bool) {
	u, err := url.Parse(a.server)
	if err != nil {
		return netip.Addr{}, false
	}
	ip, err := netip.ParseAddr(u.Hostname())
	return ip, err == nil && ip.Is4()
}

// requeueAll reconciles every sandbox of this host again.
func (a *Agent) requeueAll(ctx context.Context) {
	var list v1alpha1.SandboxList
	if err := a.client.List(ctx, &list); err != nil {
		return
	}
	for i := range list.Items {
		select {
		case a.wake <- event.GenericEvent{Object: &list.Items[i]}:
		case <-ctx.Done():
			return
		}
	}
}
