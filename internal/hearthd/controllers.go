package hearthd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/hostlifecycle"
	"hearth.dev/hearth/internal/migration"
	"hearth.dev/hearth/internal/network/ipam"
	"hearth.dev/hearth/internal/quota"
	"hearth.dev/hearth/internal/scheduler"
	"hearth.dev/hearth/internal/scheme"
	"hearth.dev/hearth/internal/warmpool"
)

// Scheme has hearth's types and Kubernetes' built-in ones, for the
// controllers' clients.
var Scheme = scheme.Scheme

var clientcmdNegotiator = clientgoscheme.Codecs.WithoutConversion()

// SystemNamespace holds the control plane's own objects (its leader
// election lease).
const SystemNamespace = "hearth-system"

// ControllerOptions configure the control plane's controllers.
type ControllerOptions struct {
	// Placement is the scheduler's default policy: Spread or Binpack.
	Placement string
	// HostTimeout: a host whose lease is not renewed for this long is
	// NotReady. HostLostAfter: one NotReady for this long is lost, and its
	// sandboxes are placed again elsewhere.
	HostTimeout, HostLostAfter time.Duration
	// Disabled runs no controllers (benchmarks that drive the scheduler
	// themselves).
	Disabled bool
	// SandboxCIDR is the cluster's sandbox range; each host gets a
	// /HostCIDRSize of it.
	SandboxCIDR  string
	HostCIDRSize int
	cluster      netip.Prefix
	// IsolateNamespaces: a sandbox accepts connections from sandboxes of
	// other namespaces only where a NetworkPolicy of its own allows them.
	IsolateNamespaces bool
}

// AddFlags registers the controllers' flags.
func (o *ControllerOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Placement, "placement", string(v1alpha1.PlacementSpread), "the scheduler's default placement: Spread (emptiest host) or Binpack (fullest that fits); a sandbox's spec.placement overrides it")
	fs.DurationVar(&o.HostTimeout, "host-timeout", hostlifecycle.DefaultTimeout, "a host whose heartbeat lapses this long is NotReady")
	fs.DurationVar(&o.HostLostAfter, "host-lost-after", hostlifecycle.DefaultLostAfter, "a host NotReady this long is lost: its sandboxes are placed on other hosts")
	fs.StringVar(&o.SandboxCIDR, "sandbox-cidr", "10.244.0.0/16", "the cluster's sandbox addresses (give every member and node the same); what sandboxes send beyond it is NAT'ed")
	fs.BoolVar(&o.IsolateNamespaces, "isolate-namespaces", true, "sandboxes accept connections from other namespaces' sandboxes only where a NetworkPolicy of their own namespace allows them (give every node the same)")
	fs.IntVar(&o.HostCIDRSize, "host-cidr-size", 24, "the prefix length of each host's share of --sandbox-cidr (a /24 holds 253 sandboxes)")
}

func (o *ControllerOptions) validate() error {
	switch v1alpha1.Placement(o.Placement) {
	case v1alpha1.PlacementSpread, v1alpha1.PlacementBinpack:
	case "":
		o.Placement = string(v1alpha1.PlacementSpread)
	default:
		return fmt.Errorf("--placement %q: want Spread or Binpack", o.Placement)
	}
	if o.HostTimeout < 0 || o.HostLostAfter < 0 {
		return errors.New("--host-timeout and --host-lost-after must not be negative")
	}
	var err error
	o.cluster, err = ipam.Validate(o.SandboxCIDR, o.HostCIDRSize)
	return err
}

// runControllers runs the control plane's controllers (the scheduler, the
// host lifecycle, the warm pools), leader-elected so that several
// control-plane members can run. A member that loses the lease (its API
// calls too slow to renew it, on a loaded machine) stops its controllers
// and campaigns again, rather than ending hearthd: with one member, an
// exit would take the whole control plane down.
func runControllers(ctx context.Context, log *slog.Logger, cfg *rest.Config, o ControllerOptions) error {
	for {
		err := runControllersOnce(ctx, log, cfg, o)
		if ctx.Err() != nil || err == nil || !strings.Contains(err.Error(), "leader election lost") {
			return err
		}
		log.Warn("controllers lost the leader lease; campaigning again", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

func runControllersOnce(ctx context.Context, log *slog.Logger, cfg *rest.Config, o ControllerOptions) error {
	c, err := client.New(cfg, client.Options{Scheme: Scheme})
	if err != nil {
		return err
	}
	for _, ns := range []string{"default", SystemNamespace, v1alpha1.LeaseNamespace} {
		err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create namespace %s: %w", ns, err)
		}
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  Scheme,
		Logger:                  logrFrom(log),
		Metrics:                 metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress:  "0",
		LeaderElection:          true,
		LeaderElectionID:        "hearth-controllers",
		LeaderElectionNamespace: SystemNamespace,
		// A stopped hearthd hands the lease over at once; a crashed one
		// holds it for LeaseDuration, during which nothing is scheduled.
		LeaderElectionReleaseOnCancel: true,
		LeaseDuration:                 ptr.To(8 * time.Second),
		RenewDeadline:                 ptr.To(5 * time.Second),
		RetryPeriod:                   ptr.To(time.Second),
		// Controller names are registered process-wide (for metrics);
		// after a lost lease the same controllers start again.
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
		// No controller reads managedFields: the cache drops them, and
		// so do the full-object writes made from cached objects (the
		// scheduler's status updates), whose managedFields the API server
		// would decode and coerce on every request; a request without
		// them keeps the stored ones. A status write costs ~17% less CPU.
		Cache: cache.Options{DefaultTransform: cache.TransformStripManagedFields()},
	})
	if err != nil {
		return err
	}
	sched := &scheduler.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-scheduler"), Log: log,
		Policy: v1alpha1.Placement(o.Placement)}
	if err := sched.SetupWithManager(mgr); err != nil {
		return err
	}
	life := &hostlifecycle.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-host-lifecycle"), Log: log,
		Timeout: o.HostTimeout, LostAfter: o.HostLostAfter}
	if err := life.SetupWithManager(ctx, mgr); err != nil {
		return err
	}
	ranges := &ipam.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-ipam"), Log: log,
		Cluster: o.cluster, Bits: o.HostCIDRSize}
	if err := ranges.SetupWithManager(mgr); err != nil {
		return err
	}
	pools := &warmpool.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-warmpool"), Log: log}
	if err := pools.SetupWithManager(ctx, mgr); err != nil {
		return err
	}
	moves := &migration.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-migration"), Log: log,
		Policy: v1alpha1.Placement(o.Placement)}
	if err := moves.SetupWithManager(mgr); err != nil {
		return err
	}
	quotas := &quota.Controller{Client: mgr.GetClient(), Log: log}
	if err := quotas.SetupWithManager(mgr); err != nil {
		return err
	}
	return mgr.Start(ctx)
}
