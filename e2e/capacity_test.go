package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"golang.org/x/sync/errgroup"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/hostsim"
)

// TestThousandSandboxesOverTooFewHosts creates 1,000 sandboxes against
// room for 12 at a time, on three hosts that exist only as API objects
// and "run" each sandbox for 200 ms (internal/hostsim; booting 1,000 VMs
// is beyond this machine). The control plane is the real one. None may
// be lost, none started twice or on two hosts, no host may run more than
// it has room for, and all must end as earlier ones finish.
func TestThousandSandboxesOverTooFewHosts(t *testing.T) {
	const n = 1000
	h := newHarness(t)
	c := startCluster(t, h, "--roles", "control-plane")
	cfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = -1, 0
	cl, err := client.NewWithWatch(cfg, client.Options{Scheme: hearthd.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	sim, err := hostsim.Start(ctx, hostsim.Options{Client: cl, Hosts: 3, Prefix: "sim", RunFor: 200 * time.Millisecond, Heartbeat: 2 * time.Second,
		Allocatable: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("64Gi"),
			v1alpha1.ResourceSandboxes: resource.MustParse("100")}})
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Stop()

	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range n {
		g.Go(func() error {
			return cl.Create(gctx, &v1alpha1.Sandbox{
				ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: fmt.Sprintf("many-%04d", i)},
				Spec: v1alpha1.SandboxSpec{Image: "registry.example/job:1", Command: []string{"true"},
					Resources: v1alpha1.Resources{CPU: ptr.To(resource.MustParse("1"))}},
			})
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d sandboxes created in %s", n, time.Since(start).Round(time.Millisecond))

	var list v1alpha1.SandboxList
	sawUnschedulable := false
	for {
		if err := cl.List(ctx, &list, client.InNamespace("default")); err != nil {
			t.Fatal(err)
		}
		done := 0
		for _, sb := range list.Items {
			if sb.Status.Phase == v1alpha1.PhaseSucceeded {
				done++
			}
			if sb.Status.Reason == "Unschedulable" && sb.Status.Message == "0/3 hosts are available: 3 insufficient cpu." {
				sawUnschedulable = true
			}
		}
		if done == n {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("%d of %d sandboxes succeeded after %s; simulated hosts: %+v", done, n, time.Since(start), sim.Report())
		}
		time.Sleep(time.Second)
	}
	t.Logf("all %d ran and ended in %s", n, time.Since(start).Round(time.Millisecond))
	if len(list.Items) != n {
		t.Errorf("%d sandboxes listed, want %d", len(list.Items), n)
	}
	r := sim.Report()
	if r.Started != n || r.Finished != n {
		t.Errorf("the hosts started %d and finished %d sandboxes, want %d", r.Started, r.Finished, n)
	}
	for _, p := range r.Problems {
		t.Error(p)
	}
	if !sawUnschedulable {
		t.Error("no sandbox waited with the reason 0/3 hosts are available: 3 insufficient cpu.")
	}
	if err := cl.DeleteAllOf(ctx, &v1alpha1.Sandbox{}, client.InNamespace("default")); err != nil {
		t.Fatal(err)
	}
	for {
		if err := cl.List(ctx, &list, client.InNamespace("default")); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("%d sandboxes not deleted", len(list.Items))
		}
		time.Sleep(500 * time.Millisecond)
	}
}
