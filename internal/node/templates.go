package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// A host makes its own snapshot of a template the first time a sandbox
// placed on it needs one: it boots the template's VM in the agent, waits
// for the readiness check, saves it under TemplateDir/NAMESPACE_NAME/HASH
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

// make boots the template, waits until it is ready and saves it in dir.
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
	images := &image.Store{Dir: a.cfg.Images.Dir, Log: a.log,
		Source: image.SourceOptions{Insecure: a.cfg.InsecureRegistries, Timeout: 30 * time.Second}}
	rt, err := sandbox.NewRuntime(images, a.cfg.Accel, image.PullMissing, "", a.log)
	if err != nil {
		return err
	}
	rt.RunRoot, rt.Reserve = a.cfg.VMDir, true
	out := &vmm.TailBuffer{Max: 2048}
	targets := make(chan sandbox.Target, 1)
	done := make(chan runEnd, 1)
	runCtx, stop := context.WithCancel(ctx)
	go func() {
		res, err := rt.Run(runCtx, spec, sandbox.IO{Stdout: out, Stderr: out, Target: func(t sandbox.Target) { targets <- t }})
		done <- runEnd{res, err}
	}()
	defer func() {
		stop()
		<-done
	}()
	var target sandbox.Target
	select {
	case target = <-targets:
	case e := <-done:
		done <- e
		return e.failure(out)
	}
	if err := ready(ctx, tpl.Spec.Readiness, target, timeout, done, out); err != nil {
		return err
	}
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	if err := sandbox.Snapshot(ctx, &qemu.Driver{}, target, tmp); err != nil {
		return errors.Join(err, os.RemoveAll(tmp))
	}
	return os.Rename(tmp, dir)
}

// runEnd is how a template's run ended.
type runEnd struct {
	res *sandbox.Result
	err error
}

func (e runEnd) failure(out *vmm.TailBuffer) error {
	if e.err != nil {
		return e.err
	}
	if e.res.Error != "" {
		return fmt.Errorf("the template's process could not start: %s", e.res.Error)
	}
	return fmt.Errorf("the template's process exited with code %d before it was ready (%s)", e.res.ExitCode, output(out))
}

// ready runs the readiness check until it passes, the VM ends, or the
// timeout. The checks use exec port 1: nothing else execs in a template.
func ready(ctx context.Context, r *v1alpha1.Readiness, target sandbox.Target, timeout time.Duration, done chan runEnd, out *vmm.TailBuffer) error {
	if r == nil {
		return nil
	}
	deadline := time.Now().Add(timeout)
	for {
		var err error
		if len(r.Exec) > 0 {
			check := &vmm.TailBuffer{Max: 512}
			var res *sandbox.Result
			res, err = sandbox.Exec(ctx, &qemu.Driver{}, target, 1, sandbox.ExecSpec{Args: r.Exec},
				sandbox.IO{Stdout: check, Stderr: check}, nil)
			switch {
			case err != nil:
			case res.Error != "":
				err = errors.New(res.Error)
			case res.ExitCode != 0:
				err = fmt.Errorf("%q exited with code %d (%s)", r.Exec, res.ExitCode, output(check))
			}
		} else {
			err = sandbox.Control(ctx, &qemu.Driver{}, target, 1, protocol.Start{Control: protocol.Probe, Port: int(r.TCPPort)})
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %v", timeout, err)
		}
		select {
		case e := <-done:
			done <- e
			return e.failure(out)
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

// templateSpec is what a template boots.
func templateSpec(tpl *v1alpha1.SandboxTemplate) sandbox.Spec {
	s := specOf(tpl.Name, tpl.Spec.Image, tpl.Spec.Command, tpl.Spec.Args, tpl.Spec.Env, tpl.Spec.Resources)
	s.WorkingDir, s.User = tpl.Spec.WorkingDir, tpl.Spec.User
	return s
}

// output is what a template's process printed last, for an error message.
func output(t *vmm.TailBuffer) string {
	if s := strings.TrimSpace(t.Tail(t.Max)); s != "" {
		return "output: " + s
	}
	return "no output"
}
