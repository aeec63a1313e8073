package node

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/shim"
	"hearth.dev/hearth/internal/vmm"
)

// Restart back-off: 1 s, doubling, at most a minute, as the kubelet's
// (whose 10 s start is long for sandboxes that boot in a second).
const (
	backoffBase = time.Second
	backoffMax  = time.Minute
	stopGrace   = 10 * time.Second
	// maxBootRetries is how many times a sandbox whose VM did not boot is
	// booted again before it fails.
	maxBootRetries = 2
)

func controllerOptions() controller.Options {
	// Starting and stopping VMs waits on processes: let several go at once.
	return controller.Options{MaxConcurrentReconciles: 8}
}

// Reconcile brings one sandbox's VM in line with its object: measure what
// is on disk, then act.
func (a *Agent) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var sb v1alpha1.Sandbox
	if err := a.client.Get(ctx, req.NamespacedName, &sb); err != nil {
		if apierrors.IsNotFound(err) {
			// Gone from this host (deleted, or bound elsewhere): the
			// garbage collector stops and removes what it left.
			a.collectSoon()
		}
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if sb.Status.HostName != a.cfg.Name {
		a.collectSoon()
		return reconcile.Result{}, nil
	}
	dir := a.sandboxDir(sb.UID)
	if !sb.DeletionTimestamp.IsZero() {
		return reconcile.Result{}, a.remove(ctx, &sb, dir)
	}
	if meta.IsStatusConditionTrue(sb.Status.Conditions, v1alpha1.ConditionEvicting) {
		return reconcile.Result{}, a.evict(ctx, &sb, dir)
	}
	runs, err := listRuns(dir)
	if err != nil {
		return reconcile.Result{}, err
	}
	orig := sb.DeepCopy()
	res, err := a.step(ctx, &sb, dir, runs)
	if err != nil {
		return reconcile.Result{}, err
	}
	if sb.Status.Phase.Terminal() {
		// Its VM is gone: so are its tap and its hold on the address.
		if err := a.net.release(sb.UID, dir); err != nil {
			a.log.Warn("release a sandbox's network", "sandbox", sb.Namespace+"/"+sb.Name, "err", err)
		}
	}
	if err := a.writeStatus(ctx, orig, &sb); err != nil {
		if apierrors.IsConflict(err) {
			return reconcile.Result{Requeue: true}, nil
		}
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	return res, nil
}

// step decides what the sandbox's runs call for and sets its status.
func (a *Agent) step(ctx context.Context, sb *v1alpha1.Sandbox, dir string, runs []int) (reconcile.Result, error) {
	st := &sb.Status
	if sb.Annotations[v1alpha1.AnnotationClaimedBy] != "" {
		// A warm pool's sandbox that a claim takes over: its VM is the
		// claim's now (adopt), not to be restarted nor stopped here.
		return reconcile.Result{}, nil
	}
	if len(runs) == 0 && st.WarmPoolMember != "" && !st.Phase.Terminal() {
		adopted, err := a.adopt(ctx, sb, dir)
		if err != nil {
			return reconcile.Result{}, err
		}
		if adopted {
			if runs, err = listRuns(dir); err != nil {
				return reconcile.Result{}, err
			}
		}
	}
	if len(runs) == 0 {
		if st.Phase.Terminal() {
			return reconcile.Result{}, nil
		}
		// Not taken over (the pool's VM ended first): started from the
		// pool's template instead.
		return a.start(ctx, sb, dir, 0)
	}
	n := runs[len(runs)-1]
	run := runDir(dir, n)
	state, err := shim.ReadState(run)
	if err != nil {
		return reconcile.Result{}, err
	}
	alive := shim.Alive(run)
	st.RestartCount = int32(n)

	// The deadline counts from the first start and ends the sandbox.
	var untilDeadline time.Duration
	if deadline, ok := a.deadline(sb, dir); ok && !st.Phase.Terminal() {
		if untilDeadline = time.Until(deadline); untilDeadline <= 0 {
			if err := shim.Stop(ctx, run, stopGrace); err != nil {
				return reconcile.Result{}, err
			}
			a.finish(sb, shim.State{FinishedAt: time.Now(), ExitCode: 128 + 9, Reason: "DeadlineExceeded",
				Message: fmt.Sprintf("the sandbox ran longer than its timeoutSeconds (%d)", *sb.Spec.TimeoutSeconds)}, true)
			a.recorder.Eventf(sb, corev1.EventTypeWarning, "DeadlineExceeded", "Stopped after %ds", *sb.Spec.TimeoutSeconds)
			return reconcile.Result{}, nil
		}
	}

	if alive && st.Phase.Terminal() {
		// Ended by the control plane while this host was cut off (its
		// sandboxes were declared lost): the VM still here is a stale copy.
		a.log.Info("stopping the VM of a sandbox that ended elsewhere", "sandbox", sb.Namespace+"/"+sb.Name, "reason", st.Reason)
		return reconcile.Result{}, shim.Stop(ctx, run, stopGrace)
	}
	if alive {
		if err := a.net.adopted(sb, dir); err != nil {
			a.log.Warn("network of a running sandbox", "sandbox", sb.Namespace+"/"+sb.Name, "err", err)
		}
		a.watches.ensure(sb, run)
		a.observe(sb, state)
		return reconcile.Result{RequeueAfter: untilDeadline}, nil
	}
	if state.Phase != shim.Exited {
		// The shim died without a word (killed, crashed): its VM died with it.
		state = shim.State{Phase: shim.Exited, FinishedAt: time.Now(), ExitCode: 128 + 9, Reason: "Error",
			Message: "the sandbox's supervisor process died"}
	}
	if st.Phase.Terminal() {
		return reconcile.Result{}, nil
	}
	if state.Reason == "Migrated" {
		if a.movedAway(ctx, run) {
			// Its VM runs on the target: the control plane binds it
			// there, and this host's copy of it is garbage from then on.
			return reconcile.Result{RequeueAfter: 5 * time.Second}, nil
		}
		// Handed over, and the migration failed after all: the sandbox
		// runs nowhere, as if its VM had died.
		state.ExitCode, state.Reason = 128+9, "Error"
		state.Message = "the sandbox moved to another host, and its migration failed after the switch"
	}
	// A VM that did not boot is the host's failure, not the workload's:
	// boot again a few times, whatever the restart policy, as the kubelet
	// retries a pod sandbox it could not create.
	bootRetry := state.Reason == "BootError" && n < maxBootRetries
	// A guest that broke the protocol (in any session: its shim ended
	// the VM) is the attacker's: its sandbox ends, whatever the policy.
	if state.Reason == "GuestProtocolError" {
		a.recorder.Eventf(sb, corev1.EventTypeWarning, "GuestProtocolError", "Stopped: its guest broke the protocol")
	}
	if state.Reason == "GuestProtocolError" || (!bootRetry && !restarts(sb.Spec.RestartPolicy, state.ExitCode)) {
		a.observe(sb, state)
		a.finish(sb, state, false)
		return reconcile.Result{}, nil
	}
	a.observe(sb, state)
	backoff := time.Duration(math.Min(float64(backoffBase)*math.Pow(2, float64(n)), float64(backoffMax)))
	if state.StartedAt.IsZero() || state.FinishedAt.Sub(state.StartedAt) > 10*time.Minute {
		backoff = backoffBase
	}
	if wait := time.Until(state.FinishedAt.Add(backoff)); wait > 0 {
		st.Phase, st.Reason = v1alpha1.PhaseScheduled, "BackOff"
		st.Message = fmt.Sprintf("run %d exited with %d; starting again in %s", n, state.ExitCode, wait.Round(100*time.Millisecond))
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	a.recorder.Eventf(sb, corev1.EventTypeNormal, "Restarting", "Run %d exited with %d (%s); starting run %d", n, state.ExitCode, state.Reason, n+1)
	return a.start(ctx, sb, dir, n+1)
}

func restarts(p v1alpha1.RestartPolicy, code int) bool {
	switch p {
	case v1alpha1.RestartAlways:
		return true
	case v1alpha1.RestartOnFailure:
		return code != 0
	}
	return false
}

// deadline is when a sandbox with timeoutSeconds must end: from the time
// its first run was started (the sandbox directory's birth).
func (a *Agent) deadline(sb *v1alpha1.Sandbox, dir string) (time.Time, bool) {
	if sb.Spec.TimeoutSeconds == nil {
		return time.Time{}, false
	}
	b, err := os.ReadFile(filepath.Join(dir, startedFile))
	if err != nil {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b)))
	if err != nil {
		return time.Time{}, false
	}
	return t.Add(time.Duration(*sb.Spec.TimeoutSeconds) * time.Second), true
}

// startedFile, in a sandbox directory, holds when its first run started
// (RFC 3339): its timeoutSeconds count from there.
const startedFile = "started"

// markStarted records t as when the sandbox in dir started.
func markStarted(dir string, t time.Time) error {
	return os.WriteFile(filepath.Join(dir, startedFile), []byte(t.Format(time.RFC3339Nano)), 0o600)
}

// start starts run n of the sandbox.
func (a *Agent) start(ctx context.Context, sb *v1alpha1.Sandbox, dir string, n int) (reconcile.Result, error) {
	if sb.Spec.Isolation == v1alpha1.IsolationHardware && a.cfg.Accel != vmm.KVM {
		// The scheduler never binds it here; a restart after this host
		// came back without KVM, or a binding written by hand, could.
		a.finish(sb, shim.State{FinishedAt: time.Now(), ExitCode: 125, Reason: "IsolationUnavailable",
			Message: "spec.isolation is hardware, and this host runs guests under " + string(a.cfg.Accel)}, true)
		return reconcile.Result{}, nil
	}
	if a.net.enabled {
		if !a.net.isReady() {
			st := &sb.Status
			st.Reason, st.Message = "WaitingForNetwork", "the host has no sandbox range from the control plane yet"
			return reconcile.Result{RequeueAfter: time.Second}, nil
		}
		// The address first, written to the status before the VM starts
		// (the caller writes it; this reconcile ends here), so that a
		// restarted agent never leases it twice.
		if changed, err := a.net.lease(sb); err != nil || changed {
			return reconcile.Result{Requeue: changed}, err
		}
	}
	spec := shim.Spec{Sandbox: sandboxSpec(sb)}
	if sb.Spec.Source != nil {
		res, why, err := a.fromSource(ctx, sb, &spec)
		if err != nil || why != nil {
			return res, err
		}
	}
	secrets, err := a.pullSecrets(ctx, sb.Namespace, sb.Spec.ImagePullSecrets)
	if err != nil {
		st := &sb.Status
		st.Reason, st.Message = "WaitingForPullSecret", err.Error()
		return reconcile.Result{RequeueAfter: 5 * time.Second}, nil
	}
	spec.PullSecrets = secrets
	if err := spec.Sandbox.Validate(); err != nil {
		// The API's validation should have caught it; nothing will change
		// until the object does.
		a.finish(sb, shim.State{FinishedAt: time.Now(), ExitCode: 125, Reason: "InvalidSpec", Message: err.Error()}, true)
		return reconcile.Result{}, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return reconcile.Result{}, err
	}
	if a.net.enabled {
		tap, nic, err := a.net.attach(sb, dir)
		if err != nil {
			return reconcile.Result{}, fmt.Errorf("network: %w", err)
		}
		spec.Sandbox.Tap, spec.Sandbox.Network = tap, nic
	}
	if n == 0 {
		if err := markStarted(dir, time.Now()); err != nil {
			return reconcile.Result{}, err
		}
	}
	run := runDir(dir, n)
	spec.Log = filepath.Join("..", filepath.Base(logPath(dir, n))) // from the run directory
	spec.LogMax, spec.StdinOnce = a.cfg.LogMax, sb.Spec.StdinOnce
	a.hostSpec(ctx, &spec)
	if _, err := shim.Start(run, spec, a.cfg.Shim); err != nil {
		return reconcile.Result{}, err
	}
	a.watches.ensure(sb, run)
	a.log.Debug("run started", "sandbox", sb.Namespace+"/"+sb.Name, "run", n)
	st := &sb.Status
	st.ExitCode, st.FinishedAt = nil, nil
	a.observe(sb, shim.State{Phase: shim.Booting})
	st.RestartCount = int32(n)
	if spec.Snapshot != "" {
		a.recorder.Eventf(sb, corev1.EventTypeNormal, "Restoring", "Starting run %d from a snapshot", n)
	} else {
		a.recorder.Eventf(sb, corev1.EventTypeNormal, "Booting", "Pulling %s and booting run %d", spec.Sandbox.Image, n)
	}
	return reconcile.Result{}, nil
}

// pullSecrets reads the docker configs of a sandbox's or template's image
// pull secrets (the API server lets a node read those of its own
// sandboxes and of templates).
func (a *Agent) pullSecrets(ctx context.Context, namespace string, refs []corev1.LocalObjectReference) ([][]byte, error) {
	var out [][]byte
	for _, ref := range refs {
		var sec corev1.Secret
		if err := a.reader.Get(ctx, types.NamespacedName{Namespace: namespace, Name: ref.Name}, &sec); err != nil {
			return nil, fmt.Errorf("image pull secret %q: %w", ref.Name, err)
		}
		cfg, ok := sec.Data[corev1.DockerConfigJsonKey]
		if sec.Type != corev1.SecretTypeDockerConfigJson || !ok {
			return nil, fmt.Errorf("image pull secret %q is not of type %s (with %s)", ref.Name, corev1.SecretTypeDockerConfigJson, corev1.DockerConfigJsonKey)
		}
		out = append(out, cfg)
	}
	return out, nil
}

// hostSpec fills in what every shim of this host runs with.
func (a *Agent) hostSpec(ctx context.Context, spec *shim.Spec) {
	spec.Accel, spec.InsecureRegistries = string(a.cfg.Accel), a.cfg.InsecureRegistries
	spec.Tenant, spec.PrivateRegistries = true, a.cfg.PrivateRegistries
	spec.RefusedAddrs = a.net.clusterAddrs(ctx)
	spec.Host, spec.Reserve = a.cfg.Host, true
	if a.cfg.Images != nil {
		spec.ImageDir = a.cfg.Images.Dir
	}
}

// errWaiting says that a sandbox cannot start yet; its status says why.
var errWaiting = errors.New("waiting")

// fromSource sets spec up to start the sandbox from its source: a memory
// snapshot or a template's snapshot to fork, or a disk-only snapshot's
// writable layer. When it cannot start now, why is set and the status
// says why: the sandbox waits, or has failed.
func (a *Agent) fromSource(ctx context.Context, sb *v1alpha1.Sandbox, spec *shim.Spec) (res reconcile.Result, why error, err error) {
	src, key := sb.Spec.Source, types.NamespacedName{Namespace: sb.Namespace}
	fail := func(reason, format string, args ...any) (reconcile.Result, error, error) {
		a.finish(sb, shim.State{FinishedAt: time.Now(), ExitCode: 125, Reason: reason, Message: fmt.Sprintf(format, args...)}, true)
		return reconcile.Result{}, errWaiting, nil
	}
	if src.Snapshot != "" {
		var snap v1alpha1.Snapshot
		key.Name = src.Snapshot
		if err := a.client.Get(ctx, key, &snap); err != nil {
			if apierrors.IsNotFound(err) {
				return fail("SnapshotNotFound", "snapshot %q does not exist", src.Snapshot)
			}
			return reconcile.Result{}, nil, err
		}
		if snap.Status.Phase != v1alpha1.SnapshotReady || snap.Status.HostName != a.cfg.Name {
			return fail("SnapshotNotFound", "snapshot %q is not in this host's store (it is %s on host %q)",
				src.Snapshot, orNone(string(snap.Status.Phase)), snap.Status.HostName)
		}
		dir := a.snapshotPath(snap.UID)
		saved, err := sandbox.ReadSaved(dir)
		if err != nil {
			return fail("BadSnapshot", "snapshot %q: %v", src.Snapshot, err)
		}
		if saved.Memory {
			spec.Snapshot = dir
		} else {
			spec.Sandbox.DiskFrom = sandbox.DiskPath(dir)
		}
		if spec.Sandbox.Image == "" {
			spec.Sandbox.Image = saved.Image
		}
		return reconcile.Result{}, nil, nil
	}
	key.Name = src.Template
	if src.WarmPool != "" {
		var pool v1alpha1.WarmPool
		if err := a.client.Get(ctx, types.NamespacedName{Namespace: sb.Namespace, Name: src.WarmPool}, &pool); err != nil {
			if apierrors.IsNotFound(err) {
				return fail("WarmPoolNotFound", "warm pool %q does not exist", src.WarmPool)
			}
			return reconcile.Result{}, nil, err
		}
		key.Name = pool.Spec.Template
	}
	var tpl v1alpha1.SandboxTemplate
	if err := a.client.Get(ctx, key, &tpl); err != nil {
		if apierrors.IsNotFound(err) {
			return fail("TemplateNotFound", "template %q does not exist", key.Name)
		}
		return reconcile.Result{}, nil, err
	}
	dir, retryAt, err := a.templates.snapshot(&tpl, sb)
	switch {
	case err == nil:
		spec.Snapshot, spec.Sandbox.Image = dir, tpl.Spec.Image
		// A pool's sandbox is claimed later: have it warm by then.
		spec.Sandbox.WarmUp = sb.Labels[v1alpha1.LabelWarmPool] != ""
		return reconcile.Result{}, nil, nil
	case errors.Is(err, errPreparing):
		st := &sb.Status
		st.Phase, st.Reason, st.Message = v1alpha1.PhaseBooting, "PreparingTemplate", err.Error()
		return reconcile.Result{}, errWaiting, nil
	case sb.Labels[v1alpha1.LabelWarmPool] != "":
		// A warm pool's sandbox waits for the template to be tried
		// again: failing would have the pool make another at once.
		st := &sb.Status
		st.Phase, st.Reason, st.Message = v1alpha1.PhaseBooting, "TemplateError", err.Error()
		return reconcile.Result{RequeueAfter: time.Until(retryAt)}, errWaiting, nil
	}
	return fail("TemplateError", "template %q: %v", key.Name, err)
}

func orNone(s string) string {
	if s == "" {
		return "not taken"
	}
	return strings.ToLower(s)
}

// adopt moves the VM of the warm pool sandbox that sb claimed into sb's
// directory: the shim works by relative paths, so it runs on, now as
// sb's. The pool's sandbox object is deleted; its files are sb's.
func (a *Agent) adopt(ctx context.Context, sb *v1alpha1.Sandbox, dir string) (bool, error) {
	var m v1alpha1.Sandbox
	key := types.NamespacedName{Namespace: sb.Namespace, Name: sb.Status.WarmPoolMember}
	err := a.client.Get(ctx, key, &m)
	if err == nil && m.Annotations[v1alpha1.AnnotationClaimedBy] != string(sb.UID) {
		// The claim's binding may reach this cache before the member's
		// mark does: ask the API server.
		err = a.reader.Get(ctx, key, &m)
	}
	if err != nil || m.Annotations[v1alpha1.AnnotationClaimedBy] != string(sb.UID) {
		return false, client.IgnoreNotFound(err)
	}
	mdir := a.sandboxDir(m.UID)
	runs, err := listRuns(mdir)
	if err != nil || len(runs) == 0 || !shim.Alive(runDir(mdir, runs[len(runs)-1])) {
		return false, err
	}
	if sb.Spec.Isolation == v1alpha1.IsolationHardware {
		// The member's VM runs as it was started, whatever the host
		// reports now.
		if spec, err := shim.ReadSpec(runDir(mdir, runs[len(runs)-1])); err != nil || spec.Accel != string(vmm.KVM) {
			return false, err
		}
	}
	a.watches.drop(m.UID)
	_ = os.Remove(dir) // an empty directory left by an earlier attempt
	if err := os.Rename(mdir, dir); err != nil {
		return false, fmt.Errorf("take over warm pool sandbox %s: %w", m.Name, err)
	}
	// The member's address and tap go with its VM.
	sb.Status.IP = m.Status.IP
	if err := a.net.transfer(m.UID, sb.UID, m.Status.IP); err != nil {
		a.log.Warn("take over a warm pool sandbox's address", "sandbox", m.Name, "err", err)
	}
	// The claim's own life (timeoutSeconds) starts now.
	_ = markStarted(dir, time.Now())
	if err := a.client.Delete(ctx, &m); err != nil && !apierrors.IsNotFound(err) {
		a.log.Warn("delete claimed warm pool sandbox", "sandbox", m.Name, "err", err)
	}
	a.recorder.Eventf(sb, corev1.EventTypeNormal, "Claimed", "Took over warm pool sandbox %s", m.Name)
	return true, nil
}

// observe copies a run's state into the status.
func (a *Agent) observe(sb *v1alpha1.Sandbox, s shim.State) {
	st := &sb.Status
	switch s.Phase {
	case shim.Booting:
		st.Phase = v1alpha1.PhaseBooting
	case shim.Running:
		if st.Phase != v1alpha1.PhaseRunning {
			a.recorder.Eventf(sb, corev1.EventTypeNormal, "Started", "Workload running after %d ms of boot", s.BootMillis)
		}
		st.Phase, st.Reason, st.Message = v1alpha1.PhaseRunning, "", ""
	case shim.Exited:
		st.ExitCode = ptr.To(int32(s.ExitCode))
		st.FinishedAt = ptr.To(metav1.NewTime(s.FinishedAt))
		st.Reason, st.Message = s.Reason, s.Message
	}
	if !s.StartedAt.IsZero() {
		st.StartedAt = ptr.To(metav1.NewTime(s.StartedAt))
		st.BootMillis = s.BootMillis
	}
	ready := metav1.ConditionFalse
	if st.Phase == v1alpha1.PhaseRunning {
		ready = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady, Status: ready,
		Reason: string(st.Phase), Message: "the workload is " + strings.ToLower(string(st.Phase))})
}

// finish ends the sandbox for good.
func (a *Agent) finish(sb *v1alpha1.Sandbox, s shim.State, override bool) {
	st := &sb.Status
	if override || st.ExitCode == nil {
		st.ExitCode = ptr.To(int32(s.ExitCode))
		st.FinishedAt = ptr.To(metav1.NewTime(s.FinishedAt))
		st.Reason, st.Message = s.Reason, shim.ClipMessage(s.Message)
	}
	st.Phase = v1alpha1.PhaseFailed
	if *st.ExitCode == 0 && !override {
		st.Phase = v1alpha1.PhaseSucceeded
	}
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady, Status: metav1.ConditionFalse,
		Reason: string(st.Phase), Message: "the workload has ended"})
	a.recorder.Eventf(sb, corev1.EventTypeNormal, "Finished", "%s: exit code %d (%s)", st.Phase, *st.ExitCode, st.Reason)
}

// writeStatus writes what changed.
func (a *Agent) writeStatus(ctx context.Context, orig, sb *v1alpha1.Sandbox) error {
	if equalStatus(orig.Status, sb.Status) {
		return nil
	}
	a.log.Debug("status", "sandbox", sb.Namespace+"/"+sb.Name, "phase", sb.Status.Phase, "reason", sb.Status.Reason)
	return a.client.Status().Patch(ctx, sb, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
}

func equalStatus(a, b v1alpha1.SandboxStatus) bool {
	// LastTransitionTime is kept by SetStatusCondition when the status
	// does not change, so a deep comparison is exact.
	return a.Phase == b.Phase && a.Reason == b.Reason && a.Message == b.Message && a.IP == b.IP &&
		a.RestartCount == b.RestartCount && a.BootMillis == b.BootMillis &&
		ptr.Equal(a.ExitCode, b.ExitCode) && a.StartedAt.Equal(b.StartedAt) && a.FinishedAt.Equal(b.FinishedAt) &&
		conditionsEqual(a.Conditions, b.Conditions)
}

func conditionsEqual(a, b []metav1.Condition) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Type != b[i].Type || a[i].Status != b[i].Status || a[i].Reason != b[i].Reason || a[i].Message != b[i].Message {
			return false
		}
	}
	return true
}

// remove stops the sandbox's VM, removes everything it had on this host,
// and only then lets the object go.
func (a *Agent) remove(ctx context.Context, sb *v1alpha1.Sandbox, dir string) error {
	if err := a.removeRuns(ctx, sb, dir); err != nil {
		return err
	}
	if controllerutil.RemoveFinalizer(sb, v1alpha1.Finalizer) {
		if err := a.client.Update(ctx, sb); err != nil {
			return client.IgnoreNotFound(err)
		}
	}
	a.log.Debug("sandbox removed", "sandbox", sb.Namespace+"/"+sb.Name)
	return nil
}

// evict stops the sandbox here and gives it back to the scheduler, which
// places it on another host (hearth host drain).
func (a *Agent) evict(ctx context.Context, sb *v1alpha1.Sandbox, dir string) error {
	if err := a.removeRuns(ctx, sb, dir); err != nil {
		return err
	}
	orig := sb.DeepCopy()
	sb.Status.Unbind("Evicted", fmt.Sprintf("evicted from host %s (drained); placing the sandbox again", a.cfg.Name))
	a.recorder.Eventf(sb, corev1.EventTypeNormal, "Evicted", "Stopped on host %s, which is being drained", a.cfg.Name)
	if err := a.writeStatus(ctx, orig, sb); err != nil && !apierrors.IsConflict(err) {
		return client.IgnoreNotFound(err)
	}
	return nil
}

// removeRuns stops the sandbox's VMs and removes everything it had here.
func (a *Agent) removeRuns(ctx context.Context, sb *v1alpha1.Sandbox, dir string) error {
	if err := stopAll(ctx, dir); err != nil {
		return err
	}
	a.watches.drop(sb.UID)
	if err := a.net.release(sb.UID, dir); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// collectSoon asks for a garbage collection pass.
func (a *Agent) collectSoon() {
	select {
	case a.gcNow <- struct{}{}:
	default:
	}
}

// stopAll stops every live run of a sandbox directory.
func stopAll(ctx context.Context, dir string) error {
	runs, err := listRuns(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range runs {
		errs = append(errs, shim.Stop(ctx, runDir(dir, n), stopGrace))
	}
	return errors.Join(errs...)
}

// listRuns lists the run numbers in a sandbox directory, in order.
func listRuns(dir string) ([]int, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var runs []int
	for _, e := range entries {
		if s, ok := strings.CutPrefix(e.Name(), "run-"); ok && e.IsDir() {
			if n, err := strconv.Atoi(s); err == nil {
				runs = append(runs, n)
			}
		}
	}
	sort.Ints(runs)
	return runs, nil
}

// runDir is run n's directory in a sandbox directory; logPath its log.
func runDir(dir string, n int) string  { return filepath.Join(dir, "run-"+strconv.Itoa(n)) }
func logPath(dir string, n int) string { return filepath.Join(dir, strconv.Itoa(n)+".log") }

// sandboxSpec is what the runtime runs for a Sandbox (not validated: a
// sandbox with a source takes its image from it).
func sandboxSpec(sb *v1alpha1.Sandbox) sandbox.Spec {
	s := specOf(sb.Name, sb.Spec.Image, sb.Spec.Command, sb.Spec.Args, sb.Spec.Env, sb.Spec.Resources)
	s.WorkingDir, s.User, s.TTY, s.Stdin = sb.Spec.WorkingDir, sb.Spec.User, sb.Spec.TTY, sb.Spec.Stdin
	return s
}

// specOf is the spec of a sandbox or template's VM. Every VM a node agent
// starts keeps its memory in a file, so that it can be saved (Snapshot).
func specOf(name, image string, command, args []string, env []v1alpha1.EnvVar, r v1alpha1.Resources) sandbox.Spec {
	cpu, memory, disk := r.Requests()
	const mib = 1 << 20
	s := sandbox.Spec{
		Image:         image,
		Entrypoint:    command,
		Command:       args,
		CPUs:          int(cpu.Value()), // rounds up
		MemoryMiB:     int(memory.Value() / mib),
		DiskMiB:       int(disk.Value() / mib),
		Name:          name,
		Snapshottable: true,
	}
	for _, e := range env {
		s.Env = append(s.Env, e.Name+"="+e.Value)
	}
	return s
}
