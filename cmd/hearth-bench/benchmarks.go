package main

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/pflag"

	"hearth.dev/hearth/internal/bench"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

// benchmarks are hearth-bench's benchmarks, in the order `all` runs them;
// each call makes new flag values.
func benchmarks() []*benchmark {
	return []*benchmark{bootBench(), apiBench(), schedulerBench(), warmBench(), ingressBench(), policyBench(), migrateBench()}
}

// summary turns a benchmark's own result into the common shape.
func summary[R interface{ Summary() *bench.Result }](r R, err error) (*bench.Result, error) {
	if err != nil {
		return nil, err
	}
	return r.Summary(), nil
}

func accelFlag(fs *pflag.FlagSet, p *string) {
	fs.StringVar(p, "accel", "auto", "kvm, tcg or auto")
}

// guestAndJail is the guest agent, hearth's initramfs with it, and, as
// root, the jail hearth runs its VMMs in (nil otherwise): what a benchmark
// that boots hearth's guest needs.
func guestAndJail() (agent, initrd string, j *jail.Options, err error) {
	if agent, err = config.Agent(); err != nil {
		return "", "", nil, err
	}
	if initrd, err = initramfs.Ensure(filepath.Join(config.CacheDir(), "initramfs"), agent); err != nil {
		return "", "", nil, err
	}
	if os.Geteuid() == 0 { // as hearth run jails its VMMs
		if j, err = jail.HostOptions(); err != nil {
			return "", "", nil, err
		}
	}
	return agent, initrd, j, nil
}

func imageStore(e *env) *image.Store { return &image.Store{Dir: config.ImageDir(), Log: e.log} }

func bootBench() *benchmark {
	var o bench.BootOptions
	var accel string
	return &benchmark{
		name:  "boot",
		short: "Time `hearth run IMAGE true` against a bare QEMU boot of the same kernel",
		long: `Boots N sandboxes one after another from a busybox image built locally and
times each "hearth run IMAGE true", interleaved with bare qemu-system-x86_64
boots of the same kernel, the same machine and devices, and an initramfs that
powers off at once: hearth's own (the agent, told to power off) and a busybox
one. Prints p50 and p90, the ratios, the VMM's memory beyond guest RAM, and
whether a second get of a converted image converts again.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVarP(&o.N, "n", "n", 20, "boots of each kind")
			fs.IntVar(&o.MemoryMiB, "memory", 256, "guest memory in MiB")
			accelFlag(fs, &accel)
		},
		smoke: map[string]string{"n": "2"},
		run: func(ctx context.Context, e *env, dir string) (*bench.Result, error) {
			var err error
			if o.Accel, err = vmm.ParseAccel(accel); err != nil {
				return nil, err
			}
			if o.Hearth, err = config.Hearth(); err != nil {
				return nil, err
			}
			var agent string
			if agent, o.Initrd, o.Jail, err = guestAndJail(); err != nil {
				return nil, err
			}
			o.Env = append(os.Environ(), "HEARTH_RUN_DIR="+filepath.Join(dir, "run"), "HEARTH_AGENT="+agent)
			o.Kernel, o.WorkDir, o.Images, o.Out = config.Kernel(), dir, imageStore(e), e.out
			return summary(bench.Boot(ctx, o))
		},
	}
}

func apiBench() *benchmark {
	var o bench.APIOptions
	var accel string
	return &benchmark{
		name:  "api",
		short: "Sandbox creates per second through the API server, against kube-apiserver and raw etcd puts",
		long: `Starts an all-in-one hearth in this process, with its own data directory and
ports, and creates N Sandboxes through the API server from C clients (a host
selector no host matches keeps them from booting). Then the same creates
against kube-apiserver serving hearth's CRDs on an etcd of its own (where
it is built: --kube-apiserver, else $HEARTH_KUBE_APISERVER, else the cache's
kube-apiserver/, which scripts/kube-apiserver.sh builds), and N puts of
objects of the same size straight into hearth's etcd. The creates alternate
between the two API servers in --rounds rounds. With --boots (root,
QEMU and the guest kernel), it then times one sandbox from create to
Running through the API against a local run of the same image.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVarP(&o.N, "n", "n", 2000, "sandboxes to create (and etcd puts)")
			fs.IntVarP(&o.Concurrency, "concurrency", "c", 32, "clients creating at once")
			fs.IntVar(&o.Rounds, "rounds", 4, "rounds alternating between hearth's API server and kube-apiserver")
			fs.IntVar(&o.Boots, "boots", 5, "times one sandbox goes from create to Running (0: skip)")
			fs.StringVar(&o.KubeAPIServer, "kube-apiserver", "", "the kube-apiserver binary to measure against (default: $HEARTH_KUBE_APISERVER, else the cache's; none: skip)")
			accelFlag(fs, &accel)
		},
		smoke: map[string]string{"n": "200", "concurrency": "16", "rounds": "2", "boots": "1"},
		run: func(ctx context.Context, e *env, dir string) (*bench.Result, error) {
			o.WorkDir, o.Out, o.Log = dir, e.out, e.log
			if o.Boots > 0 {
				a, err := vmm.ParseAccel(accel)
				if err != nil {
					return nil, err
				}
				host, err := sandbox.HostFromEnv("")
				if err != nil {
					return nil, err
				}
				o.Runtime = sandbox.NewRuntime(host, imageStore(e), a, image.PullMissing, e.log)
			}
			return summary(bench.API(ctx, o))
		},
	}
}

func schedulerBench() *benchmark {
	var o bench.SchedulerOptions
	return &benchmark{
		name:  "scheduler",
		short: "Placements per second against a large simulated cluster, and binds per second through the API",
		long: `First the placement function alone: a snapshot of --hosts simulated hosts
in ten zones carrying --bound sandboxes of 1,000 apps (a third with required
host anti-affinity, a third preferring other zones), then --placements more
replicas placed one after another, as a scheduling pass does; against
--baseline placements that score every fitting host instead of a sample.
Then, unless --api-hosts is 0, an all-in-one control plane in this process
with --api-hosts hosts that exist only as API objects: --api-sandboxes are
created, a scheduler is started, and the time until all are bound is taken,
against plain status writes of the same sandboxes.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVar(&o.Hosts, "hosts", 10000, "simulated hosts of the placement benchmark")
			fs.IntVar(&o.Bound, "bound", 100000, "sandboxes already bound to them")
			fs.IntVar(&o.Placements, "placements", 20000, "placements timed")
			fs.IntVar(&o.Baseline, "baseline", 1000, "placements timed scoring every fitting host")
			fs.IntVar(&o.APIHosts, "api-hosts", 1000, "hosts that exist only as API objects (0: skip the API part)")
			fs.IntVar(&o.APISandboxes, "api-sandboxes", 5000, "sandboxes bound through the API")
		},
		smoke: map[string]string{"hosts": "500", "bound": "2000", "placements": "500", "baseline": "100", "api-hosts": "20", "api-sandboxes": "100"},
		run: func(ctx context.Context, e *env, dir string) (*bench.Result, error) {
			o.WorkDir, o.Out, o.Log = dir, e.out, e.log
			return summary(bench.Scheduler(ctx, o))
		},
	}
}

func warmBench() *benchmark {
	var o bench.WarmOptions
	var accel string
	return &benchmark{
		name:  "warm",
		short: "Warm starts (a warm pool claim, a template restore) against a bare QEMU restore and a cold boot",
		long: `Runs an all-in-one hearth (control plane and node agent, root) in this
process with a SandboxTemplate of a busybox image and a WarmPool of --pool.
Then -n times: a Sandbox claims the pool, and the time from its create to
the first byte of an exec's output in it is taken; every tenth start also
times a Sandbox started from the template's snapshot the same way (on a
quiet host, after the pool has refilled), and a bare QEMU restore of that
snapshot to the first byte of an exec's output sent straight to the restored
agent (the VMM alone: the baseline). Cold boots of the image are timed the same way.
Last, the host memory (PSS and RSS) of --clones pool sandboxes against as
many cold-booted ones.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVarP(&o.N, "n", "n", 50, "warm starts timed")
			fs.IntVar(&o.Pool, "pool", 3, "the warm pool's size")
			fs.IntVar(&o.Clones, "clones", 20, "VMs of each kind in the memory comparison (0: skip)")
			accelFlag(fs, &accel)
		},
		smoke: map[string]string{"n": "2", "pool": "1", "clones": "1"},
		run: func(ctx context.Context, e *env, dir string) (*bench.Result, error) {
			var err error
			if o.Accel, err = vmm.ParseAccel(accel); err != nil {
				return nil, err
			}
			o.WorkDir, o.Out, o.Log = dir, e.out, e.log
			return summary(bench.Warm(ctx, o))
		},
	}
}

func ingressBench() *benchmark {
	var o bench.IngressOptions
	return &benchmark{
		name:  "ingress",
		short: "The ingress's added latency and throughput against a direct connection and against nginx",
		long: `Serves a small HTTP response from a backend in a network namespace of its
own, and runs one load generator against it three ways, interleaved in
--rounds rounds: directly, through hearth's ingress data path (the proxy
hearthd --roles=ingress serves), and through nginx configured as a
reverse proxy (keep-alive to the backend, no access log). Each round times
requests one at a time on one connection (latency with nothing queued)
and then --conc connections flat out (requests/s, and each proxy's CPU
time per request: its processes' user and system time from /proc, a figure
less at the mercy of this machine's other load). Needs root (network
namespaces) and nginx; wrk where installed, else Go's client.`,
		flags: func(fs *pflag.FlagSet) {
			fs.DurationVar(&o.Duration, "duration", 4*time.Second, "time per target, load and round")
			fs.IntVar(&o.Conc, "conc", 16, "connections of the throughput runs")
			fs.IntVar(&o.Rounds, "rounds", 3, "rounds over the three targets")
		},
		smoke: map[string]string{"duration": "500ms", "rounds": "1"},
		run: func(ctx context.Context, e *env, _ string) (*bench.Result, error) {
			o.Out, o.Log = e.out, e.log
			return summary(bench.Ingress(ctx, o))
		},
	}
}

func policyBench() *benchmark {
	var o bench.PolicyOptions
	return &benchmark{
		name:  "policy",
		short: "TCP throughput and latency through the policy programs holding many rules, against no programs",
		long: `Routes two sandbox namespaces through a host namespace set up as a node
agent sets up a host (veths in the place of taps) and measures bulk TCP
throughput and the p99 of one-byte round trips between them: without
programs, and with the tcx policy programs on both sides holding --rules
rules each (an egress policy on one, an ingress policy on the other),
alternating in --rounds rounds. Needs root. The ratio is the median of
the rounds' throughput with the programs over without.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVar(&o.Rules, "rules", 1000, "rules in each side's policy")
			fs.DurationVar(&o.Duration, "duration", 4*time.Second, "time per measurement and round")
			fs.IntVar(&o.Rounds, "rounds", 7, "rounds (the figures are their medians)")
		},
		smoke: map[string]string{"duration": "500ms", "rounds": "1"},
		run: func(ctx context.Context, e *env, _ string) (*bench.Result, error) {
			o.Out, o.Log = e.out, e.log
			return summary(bench.Policy(ctx, o))
		},
	}
}

func migrateBench() *benchmark {
	var o bench.MigrateOptions
	var accel string
	return &benchmark{
		name:  "migrate",
		short: "Live-migrate a running guest from VMM to VMM with hearth's parameters, against QEMU's defaults",
		long: `Boots one guest (hearth's kernel and agent) and live-migrates it 2N times
between QEMU processes on this host over a socket pair, jailed as hearth
jails its VMMs (as root): the odd moves with hearth's parameters (no
bandwidth cap, a 50 ms downtime limit, auto-converge), the even ones with
QEMU's defaults (128 MiB/s, 300 ms). Prints each move's total time,
downtime (the guest's pause, as the source measured it), bytes and
dirty-memory rounds, and the p50s and their ratios. After the last move
the guest's agent must answer on its newest VMM's channel.`,
		flags: func(fs *pflag.FlagSet) {
			fs.IntVarP(&o.N, "n", "n", 10, "migrations of each kind")
			fs.IntVar(&o.MemoryMiB, "memory", 256, "guest memory in MiB")
			accelFlag(fs, &accel)
		},
		smoke: map[string]string{"n": "2"},
		run: func(ctx context.Context, e *env, dir string) (*bench.Result, error) {
			var err error
			if o.Accel, err = vmm.ParseAccel(accel); err != nil {
				return nil, err
			}
			if _, o.Initrd, o.Jail, err = guestAndJail(); err != nil {
				return nil, err
			}
			o.Kernel, o.WorkDir, o.Out = config.Kernel(), dir, e.out
			return summary(bench.Migrate(ctx, o))
		},
	}
}
