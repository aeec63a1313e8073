package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/bench"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/hearthd"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/vmm"
)

func benchCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure hearth against a bare VMM on this host",
	}
	var n, memory int
	var accelFlag string
	boot := &cobra.Command{
		Use:   "boot",
		Short: "Time `hearth run IMAGE true` against a bare QEMU boot of the same kernel",
		Long: `Boots N sandboxes one after another from a busybox image built locally and
times each "hearth run IMAGE true", interleaved with bare qemu-system-x86_64
boots of the same kernel, the same machine and devices, and an initramfs that
powers off at once: hearth's own (the agent, told to power off) and a busybox
one. Prints p50 and p90, the ratios, the VMM's memory beyond guest RAM, and
whether a second run of a converted image converts again. The last line is
one JSON object.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			accel, err := vmm.ParseAccel(accelFlag)
			if err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			work, err := os.MkdirTemp("", "hearth-bench-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			agent, err := config.Agent()
			if err != nil {
				return err
			}
			initrd, err := initramfs.Ensure(filepath.Join(config.CacheDir(), "initramfs"), agent)
			if err != nil {
				return err
			}
			env := append(os.Environ(), "HEARTH_RUN_DIR="+filepath.Join(work, "run"), "HEARTH_AGENT="+agent)
			res, err := bench.Boot(c.Context(), bench.BootOptions{
				N: n, Hearth: self, Env: env, Kernel: config.Kernel(), Initrd: initrd, Accel: accel,
				MemoryMiB: memory, WorkDir: work, Images: g.store(nil), Out: c.OutOrStdout(),
			})
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	boot.Flags().IntVarP(&n, "n", "n", 10, "boots of each kind")
	boot.Flags().IntVar(&memory, "memory", 256, "guest memory in MiB")
	boot.Flags().StringVar(&accelFlag, "accel", "auto", "kvm, tcg or auto")
	cmd.AddCommand(boot, benchAPICmd(g), benchSchedulerCmd(g), benchWarmCmd(g), benchIngressCmd(g), benchPolicyCmd(g), &cobra.Command{
		Use: "ingress-proxy LISTEN BACKEND", Hidden: true, Args: cobra.ExactArgs(2),
		Short: "the ingress data path alone, for hearth bench ingress",
		RunE:  func(_ *cobra.Command, args []string) error { return bench.ServeProxy(args[0], args[1]) },
	})
	return cmd
}

func benchWarmCmd(g *globals) *cobra.Command {
	o := bench.WarmOptions{}
	var accelFlag string
	cmd := &cobra.Command{
		Use:   "warm",
		Short: "Warm starts (a warm pool claim, a template restore) against a bare QEMU restore and a cold boot",
		Long: `Runs an all-in-one hearth (control plane and node agent, root) in this
process with a SandboxTemplate of a busybox image and a WarmPool of --pool.
Then -n times: a Sandbox claims the pool, and the time from its create to
the first byte of an exec's output in it is taken; every tenth start also
times a Sandbox started from the template's snapshot the same way, and a
bare QEMU restore of that snapshot to the guest agent's first answer (the
VMM alone: the baseline). Cold boots of the image are timed the same way.
Last, the host memory (PSS and RSS) of --clones pool sandboxes against as
many cold-booted ones. The last line is one JSON object.

hearth-shim and hearth-agent are found through $HEARTH_SHIM and
$HEARTH_AGENT, else beside this executable (make build puts them in bin/).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			var err error
			if o.Accel, err = vmm.ParseAccel(accelFlag); err != nil {
				return err
			}
			work, err := os.MkdirTemp("", "hw")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			o.WorkDir, o.Out, o.Log = work, c.OutOrStdout(), g.log
			hearthd.RouteKlog(g.log)
			res, err := bench.Warm(c.Context(), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	cmd.Flags().IntVarP(&o.N, "n", "n", 50, "warm starts timed")
	cmd.Flags().IntVar(&o.Pool, "pool", 3, "the warm pool's size")
	cmd.Flags().IntVar(&o.Clones, "clones", 20, "VMs of each kind in the memory comparison (0: skip)")
	cmd.Flags().StringVar(&accelFlag, "accel", "auto", "kvm, tcg or auto")
	return cmd
}

func benchIngressCmd(g *globals) *cobra.Command {
	o := bench.IngressOptions{}
	cmd := &cobra.Command{
		Use:   "ingress",
		Short: "The ingress's added latency and throughput against a direct connection and against nginx",
		Long: `Serves a small HTTP response from a backend in a network namespace of its
own, and runs one load generator against it three ways, interleaved in
--rounds rounds: directly, through hearth's ingress data path (the proxy
hearthd --roles=ingress serves), and through nginx configured as a
reverse proxy (keep-alive to the backend, no access log). Each round times
requests one at a time on one connection (latency with nothing queued)
and then --conc connections flat out (requests/s). Needs root (network
namespaces) and nginx. The last line is one JSON object: addedP50ms is
hearth's p50 over the direct p50 at one connection, rpsVsNginx its
requests/s over nginx's.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			o.Out, o.Log = c.OutOrStdout(), g.log
			res, err := bench.Ingress(c.Context(), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	cmd.Flags().DurationVar(&o.Duration, "duration", 4*time.Second, "time per target, load and round")
	cmd.Flags().IntVar(&o.Conc, "conc", 16, "connections of the throughput runs")
	cmd.Flags().IntVar(&o.Rounds, "rounds", 3, "rounds over the three targets")
	return cmd
}

func benchPolicyCmd(g *globals) *cobra.Command {
	o := bench.PolicyOptions{}
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "TCP throughput and latency through the policy programs holding many rules, against no programs",
		Long: `Routes two sandbox namespaces through a host namespace set up as a node
agent sets up a host (veths in the place of taps) and measures bulk TCP
throughput and the p99 of one-byte round trips between them: without
programs, and with the tcx policy programs on both sides holding --rules
rules each (an egress policy on one, an ingress policy on the other),
alternating in --rounds rounds. Needs root. The last line is one JSON
object; ratio is the throughput with the programs over without.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			o.Out, o.Log = c.OutOrStdout(), g.log
			res, err := bench.Policy(c.Context(), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	cmd.Flags().IntVar(&o.Rules, "rules", 1000, "rules in each side's policy")
	cmd.Flags().DurationVar(&o.Duration, "duration", 4*time.Second, "time per measurement and round")
	cmd.Flags().IntVar(&o.Rounds, "rounds", 7, "rounds (the figures are their medians)")
	return cmd
}

func benchAPICmd(g *globals) *cobra.Command {
	var n, conc, boots int
	var accelFlag string
	cmd := &cobra.Command{
		Use:   "api",
		Short: "Sandbox creates per second through the API server, against raw etcd puts",
		Long: `Starts an all-in-one hearth in this process, with its own data directory and
ports, and creates N Sandboxes through the API server from C clients (a host
selector no host matches keeps them from booting), then puts N objects of the
same size straight into the same etcd. With --boots (root, QEMU and the guest
kernel), it then times one sandbox from create to Running through the API
against a local run of the same image to the workload's start. The last line
is one JSON object.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			work, err := os.MkdirTemp("", "hb")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			o := bench.APIOptions{N: n, Concurrency: conc, Boots: boots, WorkDir: work, Out: c.OutOrStdout(), Log: g.log}
			if boots > 0 {
				if o.Runtime, err = g.runtime(accelFlag, "missing", "", nil, nil); err != nil {
					return err
				}
			}
			hearthd.RouteKlog(g.log)
			res, err := bench.API(c.Context(), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	cmd.Flags().IntVarP(&n, "n", "n", 2000, "sandboxes to create (and etcd puts)")
	cmd.Flags().IntVarP(&conc, "concurrency", "c", 32, "clients creating at once")
	cmd.Flags().IntVar(&boots, "boots", 5, "times one sandbox goes from create to Running (0: skip)")
	cmd.Flags().StringVar(&accelFlag, "accel", "auto", "kvm, tcg or auto")
	return cmd
}

func benchSchedulerCmd(g *globals) *cobra.Command {
	o := bench.SchedulerOptions{}
	cmd := &cobra.Command{
		Use:   "scheduler",
		Short: "Placements per second against a large simulated cluster, and binds per second through the API",
		Long: `First the placement function alone: a snapshot of --hosts simulated hosts
in ten zones carrying --bound sandboxes of 1,000 apps (a third with required
host anti-affinity, a third preferring other zones), then --placements more
replicas placed one after another, as a scheduling pass does; against
--baseline placements that score every fitting host instead of a sample.
Then, unless --api-hosts is 0, an all-in-one control plane in this process
with --api-hosts hosts that exist only as API objects: --api-sandboxes are
created, a scheduler is started, and the time until all are bound is taken,
against plain status writes of the same sandboxes. The last line is one
JSON object.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			work, err := os.MkdirTemp("", "hb")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			o.WorkDir, o.Out, o.Log = work, c.OutOrStdout(), g.log
			hearthd.RouteKlog(g.log)
			res, err := bench.Scheduler(c.Context(), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Hosts, "hosts", 10000, "simulated hosts of the placement benchmark")
	f.IntVar(&o.Bound, "bound", 100000, "sandboxes already bound to them")
	f.IntVar(&o.Placements, "placements", 20000, "placements timed")
	f.IntVar(&o.Baseline, "baseline", 1000, "placements timed scoring every fitting host")
	f.IntVar(&o.APIHosts, "api-hosts", 1000, "hosts that exist only as API objects (0: skip the API part)")
	f.IntVar(&o.APISandboxes, "api-sandboxes", 5000, "sandboxes bound through the API")
	return cmd
}
