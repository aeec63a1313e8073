package ipam

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
)

// Controller gives each Host a sandbox range (spec.sandboxCIDR) from the
// cluster's, once; a range is free again when its Host is deleted. It runs
// leader-elected, so one writer picks ranges; it remembers what it gave
// until its cache shows it, so that two hosts registering at once never
// get the same one.
type Controller struct {
	Client   client.Client
	Recorder record.EventRecorder
	Log      *slog.Logger
	Cluster  netip.Prefix
	Bits     int

	mu    sync.Mutex
	given map[string]netip.Prefix
}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	c.given = map[string]netip.Prefix{}
	return ctrl.NewControllerManagedBy(mgr).Named("hostranges").For(&v1alpha1.Host{}).Complete(c)
}

// Reconcile gives the host a range if it has none.
func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var h v1alpha1.Host
	if err := c.Client.Get(ctx, req.NamespacedName, &h); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if h.Spec.SandboxCIDR != "" {
		return reconcile.Result{}, nil
	}
	var hosts v1alpha1.HostList
	if err := c.Client.List(ctx, &hosts); err != nil {
		return reconcile.Result{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var used []netip.Prefix
	seen := map[string]bool{}
	for _, o := range hosts.Items {
		seen[o.Name] = true
		if p, err := netip.ParsePrefix(o.Spec.SandboxCIDR); err == nil {
			used = append(used, p)
			delete(c.given, o.Name) // the cache shows it now
		}
	}
	for name, p := range c.given {
		if !seen[name] {
			delete(c.given, name)
			continue
		}
		used = append(used, p)
	}
	p, err := NextRange(c.Cluster, c.Bits, used)
	if err != nil {
		c.Recorder.Eventf(&h, corev1.EventTypeWarning, "NoSandboxRange", "%v", err)
		return reconcile.Result{}, err
	}
	orig := h.DeepCopy()
	h.Spec.SandboxCIDR = p.String()
	if err := c.Client.Patch(ctx, &h, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	c.given[h.Name] = p
	c.Log.Info("host sandbox range", "host", h.Name, "range", p)
	c.Recorder.Eventf(&h, corev1.EventTypeNormal, "SandboxRange", "Sandboxes on this host get addresses from %s", p)
	return reconcile.Result{}, nil
}

// Validate checks a cluster range and a host prefix length.
func Validate(cluster string, bits int) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(cluster)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("--sandbox-cidr %q: want an IPv4 CIDR", cluster)
	}
	if bits < p.Bits() || bits > 30 {
		return netip.Prefix{}, fmt.Errorf("--host-cidr-size %d: want %d to 30", bits, p.Bits())
	}
	return p.Masked(), nil
}
