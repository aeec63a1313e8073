package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/sandboxapi"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// WarmOptions configures `hearth bench warm`.
type WarmOptions struct {
	N      int // warm starts timed (claims from the pool)
	Pool   int // the pool's size while claims are timed
	Clones int // VMs of each kind in the memory comparison
	Accel  vmm.Accel
	// WorkDir holds the all-in-one hearth's data and the image.
	WorkDir string
	Out     io.Writer
	Log     *slog.Logger
}

// WarmResult is the benchmark's figures (times in milliseconds).
type WarmResult struct {
	Accel string `json:"accel"`
	N     int    `json:"n"`
	// From creating a Sandbox that claims the warm pool to the first
	// byte of an exec's output in it, through the API.
	ClaimP50 float64 `json:"claim_p50_ms"`
	ClaimP90 float64 `json:"claim_p90_ms"`
	// The same from a Sandbox started from the template's snapshot
	// (spec.source.template: a restore on request).
	RestoreP50 float64 `json:"restore_p50_ms"`
	RestoreP90 float64 `json:"restore_p90_ms"`
	// A bare QEMU restore of the same snapshot to the first byte of an
	// exec's output sent straight to the restored agent, and a cold boot
	// (create to first exec byte, through the API).
	BareRestoreP50 float64 `json:"bare_restore_p50_ms"`
	BareRestoreP90 float64 `json:"bare_restore_p90_ms"`
	ColdBootP50    float64 `json:"cold_boot_p50_ms"`
	// ClaimRatio is ClaimP50 over BareRestoreP50 (target ≤ 1.3).
	ClaimRatio   float64 `json:"claim_ratio"`
	RestoreRatio float64 `json:"restore_ratio"`
	// Host memory of Clones VMs restored from one snapshot against as
	// many cold-booted ones: proportional set size (shared pages split
	// between the processes that map them) and plain RSS, in MiB.
	Clones        int     `json:"clones"`
	ClonesPSSMiB  float64 `json:"clones_pss_mib"`
	ColdPSSMiB    float64 `json:"cold_pss_mib"`
	ClonesRSSMiB  float64 `json:"clones_rss_mib"`
	ColdRSSMiB    float64 `json:"cold_rss_mib"`
	MemoryRatio   float64 `json:"memory_ratio"` // ClonesPSS / ColdPSS
	TemplateReady float64 `json:"template_ready_ms"`
}

// Summary is the result in the benchmarks' common shape: a claim and a
// restore on request against a bare QEMU restore (target ≤ 1.3 each), and
// the memory of clones against cold boots.
func (r *WarmResult) Summary() *Result {
	res := &Result{Bench: "warm", N: r.N, Details: r,
		Figure: NewFigure("claim_p50_ms", r.ClaimP50, "bare_restore_p50_ms", r.BareRestoreP50, Lower, 1.3),
		More: []Figure{NewFigure("template_restore_p50_ms", r.RestoreP50, "bare_restore_p50_ms", r.BareRestoreP50, Lower, 1.3),
			NewFigure("claim_p50_ms", r.ClaimP50, "cold_boot_p50_ms", r.ColdBootP50, Lower, 0)}}
	if r.Clones > 0 {
		res.More = append(res.More, NewFigure("clones_pss_mib", r.ClonesPSSMiB, "cold_pss_mib", r.ColdPSSMiB, Lower, 0))
	}
	return res
}

const warmNS = "default"

// Warm runs an all-in-one hearth (control plane and node agent) in this
// process and times warm starts against a bare restore and a cold boot.
func Warm(ctx context.Context, o WarmOptions) (*WarmResult, error) {
	res := &WarmResult{Accel: string(o.Accel), N: o.N, Clones: o.Clones}
	h, err := startHearth(ctx, o.Log, o.WorkDir, func(opts *hearthd.Options) {
		opts.Roles = []string{hearthd.RoleControlPlane, hearthd.RoleNode}
		// The benchmark's --accel chose; TCG is fine for a measurement.
		opts.Node.Name, opts.Node.CPU, opts.Node.Accel, opts.Node.AllowTCG = "bench", "1000", string(o.Accel), true
	})
	if err != nil {
		return nil, err
	}
	defer h.stop()
	w := &warm{o: o, h: h}
	defer w.cleanup()

	layout := filepath.Join(o.WorkDir, "image")
	base, err := imagebuild.Busybox()
	if err != nil {
		return nil, err
	}
	img, err := imagebuild.Image(v1.Config{Cmd: []string{"sleep", "1000000"}}, base)
	if err != nil {
		return nil, err
	}
	if err := imagebuild.WriteLayout(layout, "bench", img); err != nil {
		return nil, err
	}
	w.ref = "oci:" + layout + ":bench"
	res.ColdBootP50, err = w.coldBoots(ctx, 3)
	if err != nil {
		return nil, fmt.Errorf("cold boot: %w", err)
	}

	t0 := time.Now()
	if err := w.startPool(ctx, o.Pool); err != nil {
		return nil, err
	}
	res.TemplateReady = ms(time.Since(t0))
	fmt.Fprintf(o.Out, "template saved and a pool of %d ready in %.0f ms\n", o.Pool, res.TemplateReady)

	var claims, restores, bare []time.Duration
	restoreEvery := max(o.N/10, 1)
	for i := range o.N {
		d, err := w.claim(ctx, i)
		if err != nil {
			return nil, fmt.Errorf("claim %d: %w", i, err)
		}
		claims = append(claims, d)
		line := fmt.Sprintf("start %2d: claim to first exec byte %5.0f ms (Running at %4.0f ms)", i+1, ms(d), ms(w.running))
		if i%restoreEvery == 0 {
			// On a quiet host, as the claims are: the last claim's refill
			// (a restore and its warm-up exec) is not this start's work.
			if err := w.poolReady(ctx, w.o.Pool); err != nil {
				return nil, err
			}
			r, err := w.restore(ctx, i)
			if err != nil {
				return nil, fmt.Errorf("restore %d: %w", i, err)
			}
			rRunning := w.running
			b, err := w.bare(ctx, i)
			if err != nil {
				return nil, fmt.Errorf("bare restore %d: %w", i, err)
			}
			restores, bare = append(restores, r), append(bare, b)
			line += fmt.Sprintf("   template restore through the API %5.0f ms (Running at %4.0f ms)   bare QEMU restore %5.0f ms", ms(r), ms(rRunning), ms(b))
		}
		fmt.Fprintln(o.Out, line)
	}
	res.ClaimP50, res.ClaimP90 = pct(claims, 50), pct(claims, 90)
	res.RestoreP50, res.RestoreP90 = pct(restores, 50), pct(restores, 90)
	res.BareRestoreP50, res.BareRestoreP90 = pct(bare, 50), pct(bare, 90)
	res.ClaimRatio = round(res.ClaimP50/res.BareRestoreP50, 3)
	res.RestoreRatio = round(res.RestoreP50/res.BareRestoreP50, 3)
	fmt.Fprintf(o.Out, "warm start (claim): p50 %.0f ms, p90 %.0f ms; template restore through the API: p50 %.0f ms, p90 %.0f ms\n",
		res.ClaimP50, res.ClaimP90, res.RestoreP50, res.RestoreP90)
	fmt.Fprintf(o.Out, "bare QEMU restore of the same snapshot: p50 %.0f ms, p90 %.0f ms; claim ratio %.2f, restore ratio %.2f; cold boot p50 %.0f ms\n",
		res.BareRestoreP50, res.BareRestoreP90, res.ClaimRatio, res.RestoreRatio, res.ColdBootP50)

	if o.Clones > 0 {
		if err := w.memory(ctx, res); err != nil {
			return nil, fmt.Errorf("memory: %w", err)
		}
		fmt.Fprintf(o.Out, "memory of %d VMs: clones of one snapshot PSS %.1f MiB (RSS %.1f), cold boots PSS %.1f MiB (RSS %.1f); ratio %.2f\n",
			o.Clones, res.ClonesPSSMiB, res.ClonesRSSMiB, res.ColdPSSMiB, res.ColdRSSMiB, res.MemoryRatio)
	}
	return res, nil
}

type warm struct {
	o   WarmOptions
	h   *hearth
	ref string
	// running is, for the last start, the time from the create to the
	// sandbox's Running status, as the client saw it.
	running time.Duration
}

var benchResources = v1alpha1.Resources{CPU: ptr.To(resource.MustParse("100m")),
	Memory: ptr.To(resource.MustParse("128Mi")), Disk: ptr.To(resource.MustParse("64Mi"))}

// startPool creates the template and a pool of n, and waits until all
// are ready.
func (w *warm) startPool(ctx context.Context, n int) error {
	c := w.h.client
	tpl := &v1alpha1.SandboxTemplate{ObjectMeta: metav1.ObjectMeta{Namespace: warmNS, Name: "bench"},
		Spec: v1alpha1.SandboxTemplateSpec{Image: w.ref, Resources: benchResources}}
	if err := c.Create(ctx, tpl); err != nil {
		return err
	}
	pool := &v1alpha1.WarmPool{ObjectMeta: metav1.ObjectMeta{Namespace: warmNS, Name: "bench"},
		Spec: v1alpha1.WarmPoolSpec{Template: "bench", Replicas: int32(n)}}
	if err := c.Create(ctx, pool); err != nil {
		return err
	}
	return w.poolReady(ctx, n)
}

// poolReady waits until the pool has at least n ready sandboxes.
func (w *warm) poolReady(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	var pool v1alpha1.WarmPool
	for {
		if err := w.h.client.Get(ctx, client.ObjectKey{Namespace: warmNS, Name: "bench"}, &pool); err != nil {
			return err
		}
		if int(pool.Status.ReadyReplicas) >= n {
			return nil
		}
		if c := meta.FindStatusCondition(pool.Status.Conditions, v1alpha1.WarmPoolReady); c != nil && c.Reason == "TemplateError" {
			return fmt.Errorf("the template failed: %s", c.Message)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pool: %d of %d ready: %w", pool.Status.ReadyReplicas, n, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// claim times one claim, from its create to the first byte of an exec.
// It waits for the pool to be full first: the refill of the last claim
// (a restore, about a second of CPU under TCG) is work a host does on
// other cores, not part of this claim's start.
func (w *warm) claim(ctx context.Context, i int) (time.Duration, error) {
	if err := w.poolReady(ctx, w.o.Pool); err != nil {
		return 0, err
	}
	return w.start(ctx, &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: warmNS, Name: "claim-" + strconv.Itoa(i)},
		Spec: v1alpha1.SandboxSpec{Source: &v1alpha1.SandboxSource{WarmPool: "bench"}, Resources: benchResources}})
}

// restore times a sandbox started from the template's snapshot.
func (w *warm) restore(ctx context.Context, i int) (time.Duration, error) {
	return w.start(ctx, &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: warmNS, Name: "restore-" + strconv.Itoa(i)},
		Spec: v1alpha1.SandboxSpec{Source: &v1alpha1.SandboxSource{Template: "bench"}, Resources: benchResources}})
}

// coldBoots times n sandboxes booted from the image, one at a time.
func (w *warm) coldBoots(ctx context.Context, n int) (float64, error) {
	var ds []time.Duration
	for i := range n {
		d, err := w.start(ctx, w.coldSandbox("cold-"+strconv.Itoa(i)))
		if err != nil {
			return 0, err
		}
		fmt.Fprintf(w.o.Out, "cold boot %d: create to first exec byte %5.0f ms\n", i+1, ms(d))
		ds = append(ds, d)
	}
	return pct(ds, 50), nil
}

func (w *warm) coldSandbox(name string) *v1alpha1.Sandbox {
	return &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: warmNS, Name: name},
		Spec: v1alpha1.SandboxSpec{Image: w.ref, Resources: benchResources}}
}

// start creates sb, waits for it to run through a watch, execs `echo` in
// it and returns the time from the create to the exec's first byte; sb
// is then deleted, without waiting.
func (w *warm) start(ctx context.Context, sb *v1alpha1.Sandbox) (time.Duration, error) {
	c := w.h.client
	defer func() { _ = c.Delete(context.WithoutCancel(ctx), sb) }()
	sb, created, err := createRunning(ctx, c, sb, 5*time.Minute)
	if err != nil {
		return 0, err
	}
	w.running = time.Since(created)
	first := &firstByte{}
	if err := w.exec(ctx, sb.Name, first, "echo", "x"); err != nil {
		return 0, err
	}
	if first.at.IsZero() {
		return 0, errors.New("the exec printed nothing")
	}
	return first.at.Sub(created), nil
}

// firstByte records when its first byte was written.
type firstByte struct {
	mu sync.Mutex
	at time.Time
}

func (f *firstByte) Write(p []byte) (int, error) {
	f.mu.Lock()
	if f.at.IsZero() && len(p) > 0 {
		f.at = time.Now()
	}
	f.mu.Unlock()
	return len(p), nil
}

// exec runs a command in a sandbox through the API server, as hearth
// exec does.
func (w *warm) exec(ctx context.Context, name string, out io.Writer, command ...string) error {
	return sandboxapi.Stream(ctx, w.h.cfg, warmNS, name, "exec", command, false, nil, out, nil, nil)
}

// bare restores the template's snapshot with the VMM alone and times it
// to the first byte of an exec's output (`echo`, straight over the VM's
// channel): what hearth's warm starts are measured against, to the same
// endpoint. The writable disk is copied before the clock starts.
func (w *warm) bare(ctx context.Context, i int) (time.Duration, error) {
	dirs, _ := filepath.Glob(filepath.Join(w.h.dataDir, "node", "templates", warmNS+"_bench", "*", "sandbox.json"))
	if len(dirs) != 1 {
		return 0, fmt.Errorf("want one snapshot of the template, found %v", dirs)
	}
	snap := filepath.Dir(dirs[0])
	saved, err := sandbox.ReadSaved(snap)
	if err != nil {
		return 0, err
	}
	runDir := filepath.Join(config.RunRoot(), "bare-"+strconv.Itoa(i))
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return 0, err
	}
	defer os.RemoveAll(runDir)
	cfg, err := saved.RestoreConfig(snap, runDir)
	if err != nil {
		return 0, err
	}
	driver := &qemu.Driver{}
	t0 := time.Now()
	vm, err := driver.Restore(ctx, cfg, snap)
	if err != nil {
		return 0, err
	}
	defer vm.Kill()
	f, err := sandbox.Attach(ctx, driver, vm, saved, runDir, nil, nil, nil)
	if err != nil {
		return 0, err
	}
	defer f.Running.Close()
	if err := driver.Resume(ctx, runDir); err != nil {
		return 0, err
	}
	// The same endpoint as hearth's starts: the first byte of an exec's
	// output. Under TCG a freshly restored QEMU translates the guest's
	// fork and exec paths anew, so this is more than the agent's answer.
	first := &firstByte{}
	res, err := f.Running.Exec(ctx, sandbox.ExecSpec{Args: []string{"echo", "x"}}, sandbox.IO{Stdout: first, Stderr: io.Discard})
	if err != nil {
		return 0, fmt.Errorf("exec in the restored guest: %w", err)
	}
	if first.at.IsZero() {
		return 0, fmt.Errorf("the exec in the restored guest printed nothing (exit %d: %s)", res.ExitCode, res.Error)
	}
	return first.at.Sub(t0), nil
}

// memory compares the host memory of Clones pool sandboxes (restored from
// one snapshot) with Clones cold-booted ones.
func (w *warm) memory(ctx context.Context, res *WarmResult) error {
	c := w.h.client
	n := w.o.Clones
	var pool v1alpha1.WarmPool
	if err := c.Get(ctx, client.ObjectKey{Namespace: warmNS, Name: "bench"}, &pool); err != nil {
		return err
	}
	patch := client.MergeFrom(pool.DeepCopy())
	pool.Spec.Replicas = int32(n)
	if err := c.Patch(ctx, &pool, patch); err != nil {
		return err
	}
	if err := w.poolReady(ctx, n); err != nil {
		return err
	}
	time.Sleep(2 * time.Second) // settle
	pss, rss, err := w.vmMemory(n)
	if err != nil {
		return err
	}
	res.ClonesPSSMiB, res.ClonesRSSMiB = pss, rss
	if err := c.Delete(ctx, &pool); err != nil {
		return err
	}
	if err := w.waitVMs(ctx, 0); err != nil {
		return err
	}
	for i := range n {
		if err := c.Create(ctx, w.coldSandbox("mem-"+strconv.Itoa(i))); err != nil {
			return err
		}
	}
	if err := w.waitVMs(ctx, n); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Minute)
	for {
		var list v1alpha1.SandboxList
		if err := c.List(ctx, &list, client.InNamespace(warmNS)); err != nil {
			return err
		}
		running := 0
		for _, sb := range list.Items {
			if sb.Status.Phase == v1alpha1.PhaseRunning {
				running++
			}
		}
		if running >= n {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d cold sandboxes running after 10 minutes", running, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	if res.ColdPSSMiB, res.ColdRSSMiB, err = w.vmMemory(n); err != nil {
		return err
	}
	res.MemoryRatio = round(res.ClonesPSSMiB/res.ColdPSSMiB, 3)
	return nil
}

// vmPids are the QEMU processes of the benchmark: the node's and the
// bare restores'.
func (w *warm) vmPids() []int {
	pids := append(vmm.Pids(filepath.Join(w.h.dataDir, "node", "vms")), vmm.Pids(config.RunRoot())...)
	slices.Sort(pids)
	return slices.Compact(pids)
}

// waitVMs waits until n QEMU processes run.
func (w *warm) waitVMs(ctx context.Context, n int) error {
	deadline := time.Now().Add(5 * time.Minute)
	for len(w.vmPids()) != n {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d VMs, want %d", len(w.vmPids()), n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// vmMemory sums the PSS and RSS (MiB) of the n QEMU processes running.
func (w *warm) vmMemory(n int) (pss, rss float64, err error) {
	pids := w.vmPids()
	if len(pids) != n {
		return 0, 0, fmt.Errorf("%d VMs run, want %d", len(pids), n)
	}
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			return 0, 0, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			kib, _ := strconv.ParseFloat(f[1], 64)
			switch f[0] {
			case "Pss:":
				pss += kib / 1024
			case "Rss:":
				rss += kib / 1024
			}
		}
	}
	return round(pss, 1), round(rss, 1), nil
}

// cleanup deletes what the benchmark left, so that the node agent stops
// the VMs before hearth stops.
func (w *warm) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := w.h.client
	_ = c.DeleteAllOf(ctx, &v1alpha1.WarmPool{}, client.InNamespace(warmNS))
	_ = c.DeleteAllOf(ctx, &v1alpha1.Sandbox{}, client.InNamespace(warmNS))
	for ctx.Err() == nil {
		var list v1alpha1.SandboxList
		if err := c.List(ctx, &list, client.InNamespace(warmNS)); err != nil || len(list.Items) == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}
