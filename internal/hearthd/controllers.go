package hearthd

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/scheduler"
)

// Scheme has hearth's types and Kubernetes' built-in ones, for the
// controllers' clients.
var Scheme = runtime.NewScheme()

func init() {
	if err := clientgoscheme.AddToScheme(Scheme); err != nil {
		panic(err)
	}
	if err := v1alpha1.AddToScheme(Scheme); err != nil {
		panic(err)
	}
}

var clientcmdNegotiator = clientgoscheme.Codecs.WithoutConversion()

// SystemNamespace holds the control plane's own objects (its leader
// election lease).
const SystemNamespace = "hearth-system"

// runControllers runs the control plane's controllers (today the
// scheduler), leader-elected so that several control-plane members can run.
func runControllers(ctx context.Context, log *slog.Logger, cfg *rest.Config) error {
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
	})
	if err != nil {
		return err
	}
	sched := &scheduler.Controller{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("hearth-scheduler"), Log: log}
	if err := sched.SetupWithManager(mgr); err != nil {
		return err
	}
	return mgr.Start(ctx)
}
