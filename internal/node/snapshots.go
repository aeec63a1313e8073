package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/shim"
)

// The host's snapshot store holds one directory per Snapshot taken here,
// named by its UID: the sandbox package's files (memory, state,
// snapshot.json, disk.ext4, sandbox.json) and ownerFile. A snapshot is
// written under a temporary name and renamed into place, so that a
// directory with the Snapshot's name is whole.
const ownerFile = "owner" // namespace/name of the Snapshot

// snapshotReconciler takes the Snapshots of this host's sandboxes and
// removes their files when they are deleted.
type snapshotReconciler struct{ a *Agent }

func (r snapshotReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	a := r.a
	var s v1alpha1.Snapshot
	if err := a.client.Get(ctx, req.NamespacedName, &s); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	dir := a.snapshotPath(s.UID)
	if !s.DeletionTimestamp.IsZero() {
		if s.Status.HostName != a.cfg.Name || !controllerutil.ContainsFinalizer(&s, v1alpha1.SnapshotFinalizer) {
			return reconcile.Result{}, nil
		}
		if err := os.RemoveAll(dir); err != nil {
			return reconcile.Result{}, err
		}
		a.reportSoon()
		controllerutil.RemoveFinalizer(&s, v1alpha1.SnapshotFinalizer)
		return reconcile.Result{}, client.IgnoreNotFound(a.client.Update(ctx, &s))
	}
	if s.Status.Phase == v1alpha1.SnapshotReady || s.Status.Phase == v1alpha1.SnapshotFailed {
		return reconcile.Result{}, nil
	}
	// Only this host's sandboxes are in the cache: another host's
	// snapshot is not found here, and left to that host.
	var sb v1alpha1.Sandbox
	if err := a.client.Get(ctx, types.NamespacedName{Namespace: s.Namespace, Name: s.Spec.Sandbox}, &sb); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if sb.Status.HostName != a.cfg.Name {
		return reconcile.Result{}, nil
	}
	orig := s.DeepCopy()
	switch {
	case sb.Status.Phase.Terminal() || !sb.DeletionTimestamp.IsZero():
		s.Status.Phase, s.Status.Reason = v1alpha1.SnapshotFailed, "SandboxEnded"
		s.Status.Message = fmt.Sprintf("sandbox %s is %s: only a running sandbox can be saved", sb.Name, strings.ToLower(string(sb.Status.Phase)))
		return reconcile.Result{}, a.snapshotStatus(ctx, orig, &s)
	case sb.Status.Phase != v1alpha1.PhaseRunning:
		s.Status.Phase, s.Status.Reason, s.Status.Message = v1alpha1.SnapshotPending, "SandboxNotRunning", "waiting for sandbox "+sb.Name+" to run"
		return reconcile.Result{RequeueAfter: time.Second}, a.snapshotStatus(ctx, orig, &s)
	}
	// Ours from here: the finalizer first, so that its files are never
	// left behind by a deletion.
	if controllerutil.AddFinalizer(&s, v1alpha1.SnapshotFinalizer) {
		if err := a.client.Update(ctx, &s); err != nil {
			return reconcile.Result{}, client.IgnoreNotFound(err)
		}
		orig = s.DeepCopy()
	}
	var took time.Duration
	var size int64
	var err error
	if _, serr := os.Stat(dir); serr == nil {
		// Taken by an earlier pass whose status write this pass's cache
		// does not show yet.
		size = du(dir)
	} else {
		took, size, err = a.takeSnapshot(ctx, &s, &sb, dir)
	}
	s.Status.HostName = a.cfg.Name
	if err != nil {
		a.log.Warn("snapshot failed", "snapshot", s.Namespace+"/"+s.Name, "err", err)
		s.Status.Phase, s.Status.Reason, s.Status.Message = v1alpha1.SnapshotFailed, "SnapshotError", err.Error()
		a.recorder.Eventf(&s, "Warning", "SnapshotError", "%v", err)
	} else {
		s.Status.Phase, s.Status.Reason, s.Status.Message, s.Status.SizeBytes = v1alpha1.SnapshotReady, "", "", size
		if took > 0 {
			s.Status.Millis, s.Status.TakenAt = took.Milliseconds(), ptr.To(metav1.Now())
			a.recorder.Eventf(&s, "Normal", "Taken", "Saved sandbox %s in %d ms (%d bytes)", sb.Name, took.Milliseconds(), size)
			a.reportSoon()
		}
	}
	return reconcile.Result{}, a.snapshotStatus(ctx, orig, &s)
}

func (a *Agent) snapshotStatus(ctx context.Context, orig, s *v1alpha1.Snapshot) error {
	if orig.Status.Phase == s.Status.Phase && orig.Status.Message == s.Status.Message && orig.Status.HostName == s.Status.HostName {
		return nil
	}
	return client.IgnoreNotFound(a.client.Status().Patch(ctx, s, client.MergeFrom(orig)))
}

// takeSnapshot saves the sandbox's running VM into dir.
func (a *Agent) takeSnapshot(ctx context.Context, s *v1alpha1.Snapshot, sb *v1alpha1.Sandbox, dir string) (time.Duration, int64, error) {
	sdir, n, err := a.currentRun(string(sb.UID))
	if err != nil {
		return 0, 0, err
	}
	// One at a time per host: a snapshot copies the memory at disk speed.
	a.snapMu.Lock()
	defer a.snapMu.Unlock()
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return 0, 0, err
	}
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	// The shim that owns the VM takes it (shim.Snapshot).
	err = shim.Snapshot(ctx, runDir(sdir, n), tmp, s.Spec.DiskOnly)
	took := time.Since(t0)
	if err == nil {
		err = os.WriteFile(filepath.Join(tmp, ownerFile), []byte(s.Namespace+"/"+s.Name), 0o600)
	}
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err != nil {
		return 0, 0, errors.Join(err, os.RemoveAll(tmp))
	}
	return took, du(dir), nil
}

// du is the space the files under dir take (sparse files count their
// allocated blocks).
func du(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512 // st_blocks counts 512-byte units
			} else {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// snapshotPath is where the snapshot with uid lives in the store.
func (a *Agent) snapshotPath(uid types.UID) string {
	return filepath.Join(a.cfg.SnapshotDir, string(uid))
}

// heldSnapshots lists the snapshots in the store (namespace/name), sorted.
func (a *Agent) heldSnapshots() []string {
	entries, _ := os.ReadDir(a.cfg.SnapshotDir)
	var out []string
	for _, e := range entries {
		if b, err := os.ReadFile(filepath.Join(a.cfg.SnapshotDir, e.Name(), ownerFile)); err == nil {
			out = append(out, string(b))
		}
	}
	sort.Strings(out)
	return out
}

// collectSnapshots removes the store's snapshots whose object is gone
// (deleted while the agent was down) and half-written ones.
func (a *Agent) collectSnapshots(ctx context.Context) error {
	entries, err := os.ReadDir(a.cfg.SnapshotDir)
	if err != nil || len(entries) == 0 {
		return nil
	}
	var list v1alpha1.SnapshotList
	if err := a.reader.List(ctx, &list); err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, s := range list.Items {
		keep[string(s.UID)] = true
	}
	// A snapshot being written is under its temporary name; one left by
	// an agent that died while writing it is removed.
	busy := !a.snapMu.TryLock()
	if !busy {
		defer a.snapMu.Unlock()
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if keep[name] || (busy && strings.HasSuffix(name, ".tmp")) {
			continue
		}
		a.log.Info("removing a snapshot that no longer exists", "dir", name)
		errs = append(errs, os.RemoveAll(filepath.Join(a.cfg.SnapshotDir, name)))
		a.reportSoon()
	}
	return errors.Join(errs...)
}
