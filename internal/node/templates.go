package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/shim"
	"hearth.dev/hearth/internal/vmm"
)

// A host makes its own snapshot of a template the first time a sandbox
// placed on it needs one: it boots the template's VM in a shim run of its
// own (under the builds directory), waits for the readiness check, saves it under TemplateDir/NAMESPACE_NAME/HASH
// (HASH of the template's spec: a changed template is made again) and
// stops the VM. Sandboxes waiting for it are woken when it is ready. A
// template that fails is tried again after a back-off that doubles up to
// five minutes, and its status says why, on the host's entry.

// errPreparing means the template's snapshot is being made.
var errPreparing = errors.New("the template's snapshot is being made on this host")

type templates struct {
	a *Agent
	// ctx is the agent's: builds end with it, and the agent waits for
	// them (wg) so that no VM of theirs outlives it.
	ctx context.Context
	wg  sync.WaitGroup
	mu  sync.Mutex
	// builds by namespace/name.
	builds map[string]*templateBuild
	// running holds the run directories (under buildsDir) of the builds
	// that run now.
	running map[string]bool
}

type templateBuild struct {
	hash     string
	running  bool
	err      error
	failures int
	retryAt  time.Time
	waiters  map[types.NamespacedName]bool
}

// snapshot returns the directory of this host's snapshot of tpl, or
// errPreparing while it is made (sb is woken when that ends), or why it
// could not be made, with when it will be tried again.
func (t *templates) snapshot(tpl *v1alpha1.SandboxTemplate, sb *v1alpha1.Sandbox) (string, time.Time, error) {
	key := tpl.Namespace + "/" + tpl.Name
	hash := specHash(tpl.Spec)
	dir := filepath.Join(t.a.cfg.TemplateDir, tpl.Namespace+"_"+tpl.Name, hash)
	if _, err := os.Stat(filepath.Join(dir, "sandbox.json")); err == nil {
		return dir, time.Time{}, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.builds[key]
	if b == nil || b.hash != hash {
		b = &templateBuild{hash: hash, waiters: map[types.NamespacedName]bool{}}
		t.builds[key] = b
	}
	b.waiters[types.NamespacedName{Namespace: sb.Namespace, Name: sb.Name}] = true
	if b.running {
		return "", time.Time{}, errPreparing
	}
	if b.err != nil && time.Now().Before(b.retryAt) {
		return "", b.retryAt, b.err
	}
	b.running = true
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		t.build(tpl.DeepCopy(), b, dir)
	}()
	return "", time.Time{}, errPreparing
}

func specHash(spec v1alpha1.SandboxTemplateSpec) string {
	b, _ := json.Marshal(spec)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// build makes the snapshot, records the outcome in the template's status
// and wakes the sandboxes that wait for it.
func (t *templates) build(tpl *v1alpha1.SandboxTemplate, b *templateBuild, dir string) {
	a := t.a
	log := a.log.With("template", tpl.Namespace+"/"+tpl.Name)
	log.Info("making the template's snapshot")
	t0 := time.Now()
	err := t.make(tpl, dir)
	took := time.Since(t0)

	entry := v1alpha1.TemplateHost{Name: a.cfg.Name, Hash: b.hash}
	t.mu.Lock()
	b.running = false
	if err != nil {
		b.err = err
		b.failures++
		b.retryAt = time.Now().Add(min(10*time.Second<<(b.failures-1), 5*time.Minute))
		entry.Reason, entry.Message, entry.Failures = "TemplateError", err.Error(), int32(b.failures)
		log.Warn("template failed", "err", err, "retry_in", time.Until(b.retryAt).Round(time.Second))
	} else {
		b.err, b.failures = nil, 0
		entry.Ready, entry.SnapshotAt, entry.BootMillis = true, ptr.To(metav1.Now()), took.Milliseconds()
		log.Info("template ready", "took", took)
	}
	waiters := b.waiters
	b.waiters = map[types.NamespacedName]bool{}
	t.mu.Unlock()

	if err := t.record(t.ctx, tpl, entry); err != nil {
		log.Warn("template status", "err", err)
	}
	for nn := range waiters {
		select {
		case a.wake <- event.GenericEvent{Object: &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: nn.Namespace, Name: nn.Name}}}:
		case <-t.ctx.Done():
			return
		}
	}
	a.reportSoon()
	if err == nil {
		// Older versions of the template: forks still running hold their
		// files open, so removing them is safe.
		others, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), "*"))
		for _, o := range others {
			if o != dir {
				_ = os.RemoveAll(o)
			}
		}
	}
}

// make boots the template in a shim run of its own (as any sandbox's),
// waits until it is ready, has the shim save it in dir and stops it.
func (t *templates) make(tpl *v1alpha1.SandboxTemplate, dir string) error {
	a := t.a
	spec := templateSpec(tpl)
	if err := spec.Validate(); err != nil {
		return err
	}
	timeout := 120 * time.Second
	if r := tpl.Spec.Readiness; r != nil && r.TimeoutSeconds > 0 {
		timeout = time.Duration(r.TimeoutSeconds) * time.Second
	}
	// Pulling the image and booting come on top of the readiness wait.
	ctx, cancel := context.WithTimeout(t.ctx, timeout+5*time.Minute)
	defer cancel()
	run := filepath.Join(a.buildsDir(), tpl.Namespace+"_"+tpl.Name+"_"+filepath.Base(dir))
	t.mu.Lock()
	t.running[filepath.Base(run)] = true
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.running, filepath.Base(run))
		t.mu.Unlock()
	}()
	if err := os.RemoveAll(run); err != nil {
		return err
	}
	secrets, err := a.pullSecrets(ctx, tpl.Namespace, tpl.Spec.ImagePullSecrets)
	if err != nil {
		return err
	}
	ss := shim.Spec{Sandbox: spec, Log: buildLog, LogMax: 1 << 20, PullSecrets: secrets}
	a.hostSpec(ctx, &ss)
	if _, err := shim.Start(run, ss, a.cfg.Shim); err != nil {
		return err
	}
	defer func() {
		// The agent's context may have ended: the build's VM must not
		// outlive it all the same.
		sctx, cancel := context.WithTimeout(context.Background(), stopGrace+10*time.Second)
		defer cancel()
		if err := shim.Stop(sctx, run, stopGrace); err != nil {
			a.log.Warn("stop a template's build", "run", run, "err", err)
			return
		}
		_ = os.RemoveAll(run)
	}()
	if err := waitBuild(ctx, run, func(s shim.State) bool { return s.Phase != shim.Booting }); err != nil {
		return err
	}
	if err := ready(ctx, tpl.Spec.Readiness, run, timeout); err != nil {
		return err
	}
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	if err := shim.Snapshot(ctx, run, tmp, false); err != nil {
		return errors.Join(err, os.RemoveAll(tmp))
	}
	return os.Rename(tmp, dir)
}

// buildLog is a template build's output, in its run directory.
const buildLog = "output.log"

// buildsDir holds the run directories of the templates being built.
func (a *Agent) buildsDir() string { return filepath.Join(filepath.Dir(a.cfg.StateDir), "builds") }

// waitBuild waits until the build's run is as until says, or has ended
// (an error: how it ended).
func waitBuild(ctx context.Context, run string, until func(shim.State) bool) error {
	for {
		st, err := shim.ReadState(run)
		if err != nil {
			return err
		}
		if st.Phase == shim.Exited {
			return buildFailure(run, st)
		}
		if !shim.Alive(run) {
			return errors.New("the template's supervisor process died")
		}
		if until(st) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// buildFailure is why a build's run ended before its snapshot.
func buildFailure(run string, st shim.State) error {
	switch st.Reason {
	case "Completed", "Error", "OOMKilled", "DiskFull", "Killed":
		return fmt.Errorf("the template's process exited with code %d before it was ready (%s)", st.ExitCode, output(run))
	}
	return fmt.Errorf("the template's process could not start (%s): %s", st.Reason, st.Message)
}

// ready runs the readiness check until it passes, the build's run ends,
// or the timeout.
func ready(ctx context.Context, r *v1alpha1.Readiness, run string, timeout time.Duration) error {
	if r == nil {
		return nil
	}
	deadline := time.Now().Add(timeout)
	for {
		var err error
		if len(r.Exec) > 0 {
			check := &vmm.TailBuffer{Max: 512}
			var res *sandbox.Result
			res, err = shim.Exec(ctx, run, sandbox.ExecSpec{Args: r.Exec}, sandbox.IO{Stdout: check, Stderr: check})
			switch {
			case err != nil:
			case res.Error != "":
				err = errors.New(res.Error)
			case res.ExitCode != 0:
				err = fmt.Errorf("%q exited with code %d (output: %s)", r.Exec, res.ExitCode, strings.TrimSpace(check.Tail(check.Max)))
			}
		} else {
			err = shim.Probe(ctx, run, int(r.TCPPort))
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %v", timeout, err)
		}
		// A run that ended is why, not the check.
		if werr := waitBuild(ctx, run, func(shim.State) bool { return true }); werr != nil {
			return werr
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// record sets this host's entry in the template's status.
func (t *templates) record(ctx context.Context, tpl *v1alpha1.SandboxTemplate, entry v1alpha1.TemplateHost) error {
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		var cur v1alpha1.SandboxTemplate
		if err := t.a.reader.Get(ctx, types.NamespacedName{Namespace: tpl.Namespace, Name: tpl.Name}, &cur); err != nil {
			return client.IgnoreNotFound(err)
		}
		hosts := []v1alpha1.TemplateHost{entry}
		for _, h := range cur.Status.Hosts {
			if h.Name != entry.Name {
				hosts = append(hosts, h)
			}
		}
		sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name < hosts[j].Name })
		cur.Status.Hosts = hosts
		return t.a.client.Status().Update(ctx, &cur)
	})
}

// held lists the templates (namespace/name) this host has a snapshot of.
func (t *templates) held() []string {
	dirs, _ := filepath.Glob(filepath.Join(t.a.cfg.TemplateDir, "*", "*", "sandbox.json"))
	var out []string
	for _, d := range dirs {
		if ns, name, ok := strings.Cut(filepath.Base(filepath.Dir(filepath.Dir(d))), "_"); ok {
			out = append(out, ns+"/"+name)
		}
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// collect removes the snapshots of templates that no longer exist.
func (t *templates) collect(ctx context.Context) error {
	entries, err := os.ReadDir(t.a.cfg.TemplateDir)
	if err != nil || len(entries) == 0 {
		return nil
	}
	var list v1alpha1.SandboxTemplateList
	if err := t.a.reader.List(ctx, &list); err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, tpl := range list.Items {
		keep[tpl.Namespace+"_"+tpl.Name] = true
	}
	var errs []error
	for _, e := range entries {
		if !keep[e.Name()] {
			t.a.log.Info("removing the snapshot of a template that no longer exists", "dir", e.Name())
			errs = append(errs, os.RemoveAll(filepath.Join(t.a.cfg.TemplateDir, e.Name())))
			t.a.reportSoon()
		}
	}
	return errors.Join(errs...)
}

// collectBuilds stops and removes the template builds that no build of
// this agent runs: an earlier agent's, killed while it built.
func (t *templates) collectBuilds(ctx context.Context) error {
	entries, _ := os.ReadDir(t.a.buildsDir())
	t.mu.Lock()
	running := maps.Clone(t.running)
	t.mu.Unlock()
	var errs []error
	for _, e := range entries {
		if running[e.Name()] {
			continue
		}
		run := filepath.Join(t.a.buildsDir(), e.Name())
		t.a.log.Info("stopping a template build an earlier agent left", "run", run)
		if err := shim.Stop(ctx, run, stopGrace); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, os.RemoveAll(run))
	}
	return errors.Join(errs...)
}

// templateSpec is what a template boots.
func templateSpec(tpl *v1alpha1.SandboxTemplate) sandbox.Spec {
	s := specOf(tpl.Name, tpl.Spec.Image, tpl.Spec.Command, tpl.Spec.Args, tpl.Spec.Env, tpl.Spec.Resources)
	s.WorkingDir, s.User = tpl.Spec.WorkingDir, tpl.Spec.User
	return s
}

// output is what a template's process printed last, for an error message.
func output(run string) string {
	var t vmm.TailBuffer
	t.Max = 2048
	if b, err := os.ReadFile(filepath.Join(run, buildLog)); err == nil {
		_, _ = t.Write(b)
	}
	if s := strings.TrimSpace(t.Tail(t.Max)); s != "" {
		return "output: " + s
	}
	return "no output"
}
