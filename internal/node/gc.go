package node

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/sandbox"
)

// collectGarbage kills, at start, every 30 s and when a sandbox leaves the
// host, the VMMs that no shim owns (sandbox.Sweep); removes the
// directories (and stops the VMs) of sandboxes that no
// longer exist or are no longer bound here: what a sandbox deleted while
// the agent was down left behind, and the copies a lost host still runs of
// sandboxes that were placed again elsewhere; and the snapshots of
// Snapshots and templates that no longer exist, and template builds that
// an earlier agent left running.
func (a *Agent) collectGarbage(ctx context.Context) error {
	for {
		err := errors.Join(a.collect(ctx), a.collectSnapshots(ctx), a.templates.collect(ctx), a.templates.collectBuilds(ctx))
		if err != nil && ctx.Err() == nil {
			a.log.Warn("garbage collection", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(30 * time.Second):
		case <-a.gcNow:
		}
	}
}

func (a *Agent) collect(ctx context.Context) error {
	// VMMs whose shim is gone: the parent-death signal ends them at once,
	// and this is the net below it (a VMM found here is a bug to report).
	// The run root too: VMs that an older agent started there.
	sandbox.Sweep(a.cfg.VMDir, a.log)
	sandbox.Sweep(config.RunRoot(), a.log)
	entries, err := os.ReadDir(a.cfg.StateDir)
	if err != nil {
		return err
	}
	if len(entries) == 0 {
		return a.net.collectTaps(a.cfg.StateDir)
	}
	// The cache holds exactly the sandboxes bound here (it is started by
	// the time runnables run, and synced once List returns).
	var list v1alpha1.SandboxList
	if err := a.client.List(ctx, &list); err != nil {
		return err
	}
	mine := map[types.UID]bool{}
	for _, sb := range list.Items {
		mine[sb.UID] = true
	}
	var errs []error
	for _, e := range entries {
		uid := types.UID(e.Name())
		if !e.IsDir() || mine[uid] || a.moves.receiving(uid) {
			continue // (a sandbox migrating here is bound elsewhere until the switch)
		}
		// Not in the cache may mean "created a moment ago": ask the API
		// server before removing anything.
		if a.exists(ctx, uid) {
			continue
		}
		dir := filepath.Join(a.cfg.StateDir, e.Name())
		a.log.Info("removing the leftovers of a sandbox that no longer exists", "uid", uid)
		if err := stopAll(ctx, dir); err != nil {
			errs = append(errs, err)
			continue
		}
		a.watches.drop(uid)
		errs = append(errs, a.net.release(uid, dir), os.RemoveAll(dir))
	}
	return errors.Join(append(errs, a.net.collectTaps(a.cfg.StateDir))...)
}

// exists asks the API server (not the cache) whether a sandbox with uid is
// bound to this host.
func (a *Agent) exists(ctx context.Context, uid types.UID) bool {
	var list v1alpha1.SandboxList
	if err := a.reader.List(ctx, &list, client.MatchingFields{"status.hostName": a.cfg.Name}); err != nil {
		return true // when in doubt, keep
	}
	for _, sb := range list.Items {
		if sb.UID == uid && sb.Status.HostName == a.cfg.Name {
			return true
		}
	}
	return false
}
