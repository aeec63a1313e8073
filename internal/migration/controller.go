// Package migration drives Migrations from the control plane: it checks
// that the sandbox can move, picks the target host (the Migration's, or
// the scheduler's choice among the others), fails a migration that takes
// too long or whose sandbox went away, and once the target's node agent
// reports the sandbox running there, binds the sandbox to the target with
// its address there. The two node agents move the VM
// (internal/node/migrate.go); docs/migration.md tells the whole story.
package migration

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/network/ipam"
	"hearth.dev/hearth/internal/scheduler"
)

// DefaultTimeout bounds a migration from the choice of its target to the
// switch.
const DefaultTimeout = 10 * time.Minute

// Controller is the control plane's side of migrations.
type Controller struct {
	Client   client.Client
	Recorder record.EventRecorder
	Log      *slog.Logger
	Policy   v1alpha1.Placement
	Timeout  time.Duration    // 0: DefaultTimeout
	Now      func() time.Time // nil: time.Now
}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("migrations").
		For(&v1alpha1.Migration{}).
		Complete(c)
}

func (c *Controller) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var m v1alpha1.Migration
	if err := c.Client.Get(ctx, req.NamespacedName, &m); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	var sb v1alpha1.Sandbox
	err := c.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Sandbox}, &sb)
	if err != nil && !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	found := err == nil
	deleting := !m.DeletionTimestamp.IsZero()
	switch m.Status.Phase {
	case v1alpha1.MigrationSucceeded:
		if !m.Status.Bound {
			if err := c.bind(ctx, &m, &sb, found); err != nil {
				return reconcile.Result{}, err
			}
		}
		return reconcile.Result{}, c.release(ctx, &m)
	case v1alpha1.MigrationFailed:
		return reconcile.Result{}, c.release(ctx, &m)
	case "", v1alpha1.MigrationPending:
		if deleting {
			return reconcile.Result{}, c.release(ctx, &m)
		}
		return c.start(ctx, &m, &sb, found)
	}
	// Preparing or Copying: the node agents' work, bounded. Deleted, they
	// cancel it, and the target says how it ended (it may have switched
	// already).
	timeout := c.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	switch {
	case !found || sb.UID != m.Status.SandboxUID || sb.Status.HostName != m.Status.SourceHost || !sb.DeletionTimestamp.IsZero():
		return reconcile.Result{}, c.fail(ctx, &m, "SandboxGone", "the sandbox was deleted, or no longer runs on %s", m.Status.SourceHost)
	case m.Status.StartedAt != nil && c.now().Sub(m.Status.StartedAt.Time) > timeout:
		return reconcile.Result{}, c.fail(ctx, &m, "Timeout", "not switched within %s of its start", timeout)
	}
	left := timeout
	if m.Status.StartedAt != nil {
		left -= c.now().Sub(m.Status.StartedAt.Time)
	}
	if deleting {
		left = time.Second
	}
	return reconcile.Result{RequeueAfter: max(left, time.Second)}, nil
}

// start checks that the sandbox can move now and picks its target.
func (c *Controller) start(ctx context.Context, m *v1alpha1.Migration, sb *v1alpha1.Sandbox, found bool) (reconcile.Result, error) {
	if !found {
		return reconcile.Result{}, c.fail(ctx, m, "SandboxNotFound", "sandbox %q does not exist", m.Spec.Sandbox)
	}
	if reason, why := Refusal(sb); reason != "" {
		return reconcile.Result{}, c.fail(ctx, m, reason, "%s", why)
	}
	var all v1alpha1.MigrationList
	if err := c.Client.List(ctx, &all); err != nil {
		return reconcile.Result{}, err
	}
	if first := Ahead(m, all.Items); first != "" {
		if m.Status.Phase != v1alpha1.MigrationPending || m.Status.Reason != "Waiting" {
			m.Status.Phase, m.Status.Reason = v1alpha1.MigrationPending, "Waiting"
			m.Status.Message = fmt.Sprintf("waits for migration %s of the same sandbox to end", first)
			if err := c.Client.Status().Update(ctx, m); err != nil {
				return reconcile.Result{}, client.IgnoreNotFound(err)
			}
		}
		return reconcile.Result{RequeueAfter: 2 * time.Second}, nil
	}
	var hosts v1alpha1.HostList
	if err := c.Client.List(ctx, &hosts); err != nil {
		return reconcile.Result{}, err
	}
	var sbs v1alpha1.SandboxList
	if err := c.Client.List(ctx, &sbs); err != nil {
		return reconcile.Result{}, err
	}
	target, why := Target(hosts.Items, sbs.Items, Incoming(all.Items), sb, m.Spec.TargetHost, c.Policy)
	if target == "" {
		return reconcile.Result{}, c.fail(ctx, m, "NoTarget", "%s", why)
	}
	if busy := Crowded(all.Items, sb.Status.HostName, target); busy != "" {
		if m.Status.Reason != "Waiting" || m.Status.Message != busy {
			m.Status.Phase, m.Status.Reason, m.Status.Message = v1alpha1.MigrationPending, "Waiting", busy
			if err := c.Client.Status().Update(ctx, m); err != nil {
				return reconcile.Result{}, client.IgnoreNotFound(err)
			}
		}
		return reconcile.Result{RequeueAfter: 2 * time.Second}, nil
	}
	if controllerutil.AddFinalizer(m, v1alpha1.MigrationFinalizer) {
		if err := c.Client.Update(ctx, m); err != nil {
			return reconcile.Result{}, client.IgnoreNotFound(err)
		}
	}
	now := metav1.NewTime(c.now())
	st := &m.Status
	st.Phase, st.SourceHost, st.TargetHost, st.SandboxUID, st.StartedAt = v1alpha1.MigrationPreparing, sb.Status.HostName, target, sb.UID, &now
	st.Reason, st.Message = "", ""
	if err := c.Client.Status().Update(ctx, m); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	c.Recorder.Eventf(sb, corev1.EventTypeNormal, "Migrating", "Moving from %s to %s (migration %s)", st.SourceHost, target, m.Name)
	return reconcile.Result{RequeueAfter: time.Second}, nil
}

// Refusal says why sb cannot move (reason "": it can).
func Refusal(sb *v1alpha1.Sandbox) (reason, why string) {
	switch {
	case !sb.DeletionTimestamp.IsZero():
		return "SandboxGone", "the sandbox is being deleted"
	case sb.Status.Phase != v1alpha1.PhaseRunning || sb.Status.HostName == "":
		return "NotRunning", fmt.Sprintf("the sandbox is %s, not Running on a host", orNone(string(sb.Status.Phase)))
	case sb.Spec.Source != nil || sb.Status.WarmPoolMember != "":
		// Its RAM is a private mapping of a snapshot's memory file.
		return "Unsupported", "a sandbox started from a snapshot, template or warm pool cannot migrate yet"
	}
	return "", ""
}

func orNone(s string) string {
	if s == "" {
		return "in no phase"
	}
	return s
}

// Ahead names the migration of the same sandbox that m waits for: one
// under way (or switched and not bound yet), or the oldest pending one
// before m (none: "").
func Ahead(m *v1alpha1.Migration, all []v1alpha1.Migration) string {
	for i := range all {
		o := &all[i]
		if o.UID == m.UID || o.Spec.Sandbox != m.Spec.Sandbox {
			continue
		}
		pending := o.Status.Phase == "" || o.Status.Phase == v1alpha1.MigrationPending
		older := o.CreationTimestamp.Before(&m.CreationTimestamp) ||
			(o.CreationTimestamp.Equal(&m.CreationTimestamp) && o.Name < m.Name)
		// m waits behind one under way (a deleted one is, until it has
		// ended; one that has switched, until it is bound) and behind an
		// older pending one.
		if o.InFlight() || (pending && older) {
			return o.Name
		}
	}
	return ""
}

// MaxPerHost is how many migrations a host takes part in at once (as
// source or target); more wait.
const MaxPerHost = 2

// Incoming maps the sandboxes of migrations in flight to their targets,
// where they take room before they are bound there.
func Incoming(all []v1alpha1.Migration) map[types.UID]string {
	out := map[types.UID]string{}
	for i := range all {
		if m := &all[i]; m.InFlight() {
			out[m.Status.SandboxUID] = m.Status.TargetHost
		}
	}
	return out
}

// Crowded says why a migration between source and target must wait ("":
// it need not): either host already takes part in MaxPerHost of them.
func Crowded(all []v1alpha1.Migration, source, target string) string {
	n := map[string]int{}
	for i := range all {
		if m := &all[i]; m.InFlight() {
			n[m.Status.SourceHost]++
			n[m.Status.TargetHost]++
		}
	}
	for _, h := range []string{source, target} {
		if n[h] >= MaxPerHost {
			return fmt.Sprintf("host %s takes part in %d migrations already, the most at once", h, n[h])
		}
	}
	return ""
}

// Target picks the host sb moves to: want if set (and able to take it),
// else the scheduler's choice among the Ready hosts other than sb's own,
// with every other sandbox where it is, those migrating in flight on
// their targets too (incoming). It says why when there is none.
func Target(hosts []v1alpha1.Host, sandboxes []v1alpha1.Sandbox, incoming map[types.UID]string, sb *v1alpha1.Sandbox, want string, policy v1alpha1.Placement) (string, string) {
	source := sb.Status.HostName
	if want == source {
		return "", fmt.Sprintf("the sandbox already runs on %s", source)
	}
	var cands []*scheduler.Host
	for i := range hosts {
		h := &hosts[i]
		if h.Name == source || (want != "" && h.Name != want) {
			continue
		}
		cands = append(cands, scheduler.HostFrom(h, meta.IsStatusConditionTrue(h.Status.Conditions, v1alpha1.HostConditionReady)))
	}
	if want != "" && len(cands) == 0 {
		return "", fmt.Sprintf("spec.targetHost: there is no host %q", want)
	}
	if len(cands) == 0 {
		return "", fmt.Sprintf("no host but %s", source)
	}
	snap := scheduler.NewSnapshot(cands, policy)
	for i := range sandboxes {
		o := &sandboxes[i]
		if o.UID != sb.UID && o.Status.HostName != "" && !o.Status.Phase.Terminal() {
			snap.Assume(o, o.Status.HostName)
			if to, ok := incoming[o.UID]; ok {
				snap.Assume(o, to)
			}
		}
	}
	d := snap.Place(sb)
	if d.Host == "" {
		return "", "no host can take it: " + d.Reason
	}
	return d.Host, ""
}

// bind gives the sandbox to the target once the target reports it
// running there: its host and its address there (of the target's range,
// and no other sandbox's). A migration binds once, and only the sandbox it
// began with, still on its source.
func (c *Controller) bind(ctx context.Context, m *v1alpha1.Migration, sb *v1alpha1.Sandbox, found bool) error {
	if found && sb.UID == m.Status.SandboxUID && sb.Status.HostName == m.Status.SourceHost {
		if m.Status.TargetIP != "" {
			if why := c.badAddress(ctx, m, sb); why != "" {
				// The target's word is not taken: its VM there is not
				// bound to it, and its agent ends it.
				return c.fail(ctx, m, "BadTarget", "the target's address for the sandbox: %s", why)
			}
		}
		sb.Status.HostName, sb.Status.IP, sb.Status.Migration = m.Status.TargetHost, m.Status.TargetIP, m.UID
		if err := c.Client.Status().Update(ctx, sb); err != nil {
			return err
		}
		c.Recorder.Eventf(sb, corev1.EventTypeNormal, "Migrated", "Moved from %s to %s in %d ms (paused %d ms)",
			m.Status.SourceHost, m.Status.TargetHost, m.Status.TotalMillis, m.Status.DowntimeMillis)
	}
	m.Status.Bound = true
	return client.IgnoreNotFound(c.Client.Status().Update(ctx, m))
}

// badAddress says what is wrong with the target's address for sb ("":
// nothing): it must be a sandbox address of the target's range that no
// other sandbox has.
func (c *Controller) badAddress(ctx context.Context, m *v1alpha1.Migration, sb *v1alpha1.Sandbox) string {
	var h v1alpha1.Host
	if err := c.Client.Get(ctx, types.NamespacedName{Name: m.Status.TargetHost}, &h); err != nil {
		return err.Error()
	}
	if err := ipam.CheckSandboxAddr(m.Status.TargetIP, h.Spec.SandboxCIDR); err != nil {
		return err.Error()
	}
	var sbs v1alpha1.SandboxList
	if err := c.Client.List(ctx, &sbs); err != nil {
		return err.Error()
	}
	for _, o := range sbs.Items {
		if o.UID != sb.UID && o.Status.IP == m.Status.TargetIP && !o.Status.Phase.Terminal() {
			return fmt.Sprintf("%s is sandbox %s/%s's", m.Status.TargetIP, o.Namespace, o.Name)
		}
	}
	return ""
}

// release lets a migration that has ended go (its finalizer).
func (c *Controller) release(ctx context.Context, m *v1alpha1.Migration) error {
	if controllerutil.RemoveFinalizer(m, v1alpha1.MigrationFinalizer) {
		return client.IgnoreNotFound(c.Client.Update(ctx, m))
	}
	return nil
}

// fail ends the migration with a reason; the sandbox runs on where it was.
func (c *Controller) fail(ctx context.Context, m *v1alpha1.Migration, reason, format string, args ...any) error {
	now := metav1.NewTime(c.now())
	m.Status.Phase, m.Status.Reason, m.Status.Message, m.Status.CompletedAt = v1alpha1.MigrationFailed, reason, fmt.Sprintf(format, args...), &now
	c.Log.Info("migration failed", "migration", m.Namespace+"/"+m.Name, "reason", reason, "message", m.Status.Message)
	return client.IgnoreNotFound(c.Client.Status().Update(ctx, m))
}
