// Command hearth-bench measures hearth against baselines run in the same
// process: a bare QEMU boot and restore, raw etcd puts and kube-apiserver,
// nginx, no policy programs. It is a binary of its own so that the test
// helpers the benchmarks need (network namespaces, simulated hosts) are
// not linked into what users install; `hearth bench` runs it.
//
// Every benchmark ends with one JSON line of the same shape (see
// internal/bench/result.go); `hearth-bench all --out FILE` runs them all
// and writes those lines, `hearth-bench compare A B` sets two such files
// side by side, and --smoke runs each at a size that only checks it works
// (what CI runs).
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"hearth.dev/hearth/internal/bench"
	"hearth.dev/hearth/internal/hearthd"
)

// version is set with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// env is what every benchmark gets.
type env struct {
	log   *slog.Logger
	out   io.Writer
	smoke bool
	// work is this process's scratch directory (removed at exit); it
	// holds the image store the benchmarks use, so that they leave no
	// image in the user's.
	work string
}

// scratch makes the process's scratch directory on first use (the hidden
// ingress-proxy, which the ingress benchmark SIGKILLs, never makes one).
func (e *env) scratch() error {
	if e.work != "" {
		return nil
	}
	work, err := os.MkdirTemp("", "hearth-bench-")
	if err != nil {
		return err
	}
	e.work = work
	if os.Getenv("HEARTH_IMAGE_DIR") == "" {
		// The sandboxes' shims, started by the benchmarks' node agents and
		// hearth runs, inherit it.
		os.Setenv("HEARTH_IMAGE_DIR", filepath.Join(work, "images"))
	}
	return nil
}

func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	e := &env{out: stdout}
	var logLevel, cpuProfile string
	root := &cobra.Command{
		Use:   "hearth-bench",
		Short: "Measure hearth against baselines run in the same process",
		Long: `hearth-bench runs hearth's benchmarks. Each measures hearth against a
baseline in the same run (this machine is shared and noisy: ratios hold up
where absolute times drift) and ends with one JSON line:

  {"bench":"boot","n":20,"figure":"p50_ms","value":1174,"baseline":"bare_qemu_p50_ms",
   "baseline_value":764,"ratio":1.537,"better":"lower","target":1.2,"met":false,
   "more":[...other figures of the same shape...],"details":{...}}

--smoke runs a benchmark at a size that only shows that it works and
prints its line (CI runs 'hearth-bench all --smoke'); the full sizes are
the defaults ('make bench'). Benchmarks that boot VMs need root, QEMU and
the guest kernel (make setup); they find hearth, hearth-shim and
hearth-agent beside this executable (make build puts them in bin/).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: %w", logLevel, err)
			}
			e.log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
			hearthd.RouteKlog(e.log)
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				return pprof.StartCPUProfile(f)
			}
			return nil
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if cpuProfile != "" {
				pprof.StopCPUProfile()
			}
		},
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetContext(ctx)
	pf := root.PersistentFlags()
	pf.StringVar(&logLevel, "log-level", "warn", "log level: debug, info, warn or error")
	pf.StringVar(&cpuProfile, "cpuprofile", "", "write this process's CPU profile here (the in-process control plane's included; go tool pprof reads it)")
	pf.BoolVar(&e.smoke, "smoke", false, "run at a size that only checks the benchmark works (CI); flags given still apply")

	defer func() {
		if e.work != "" {
			os.RemoveAll(e.work)
		}
	}()

	for _, b := range benchmarks() {
		root.AddCommand(b.command(e))
	}
	root.AddCommand(allCmd(e), compareCmd(), &cobra.Command{
		Use: "ingress-proxy LISTEN BACKEND", Hidden: true, Args: cobra.ExactArgs(2),
		Short: "the ingress data path alone, for hearth-bench ingress",
		RunE:  func(c *cobra.Command, args []string) error { return bench.ServeProxy(c.Context(), args[0], args[1]) },
	}, &cobra.Command{
		Use: "version", Short: "Print hearth-bench's version", Args: cobra.NoArgs,
		Run: func(c *cobra.Command, _ []string) { fmt.Fprintf(c.OutOrStdout(), "hearth-bench %s\n", version) },
	})
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "hearth-bench: %v\n", err)
		return 1
	}
	return 0
}

// benchmark is one of hearth-bench's benchmarks: its flags with the full
// run's defaults, the values --smoke gives the flags not set by hand, and
// the run itself.
type benchmark struct {
	name, short, long string
	flags             func(fs *pflag.FlagSet)
	smoke             map[string]string
	run               func(ctx context.Context, e *env, dir string) (*bench.Result, error)
}

// prepare applies --smoke's sizes to the flags not given.
func (b *benchmark) prepare(fs *pflag.FlagSet, smoke bool) error {
	if !smoke {
		return nil
	}
	for name, v := range b.smoke {
		if f := fs.Lookup(name); f != nil && !f.Changed {
			if err := fs.Set(name, v); err != nil {
				return fmt.Errorf("smoke --%s=%s: %w", name, v, err)
			}
		}
	}
	return nil
}

// measure runs the benchmark in a scratch directory of its own and marks
// a smoke result.
func (b *benchmark) measure(ctx context.Context, e *env) (*bench.Result, error) {
	if err := e.scratch(); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(e.work, b.name+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	res, err := b.run(ctx, e, dir)
	if err != nil {
		return nil, err
	}
	res.Smoke = e.smoke
	return res, nil
}

func (b *benchmark) command(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use: b.name, Short: b.short, Long: b.long + "\n\nThe last line is one JSON object (see hearth-bench --help).",
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := b.prepare(c.Flags(), e.smoke); err != nil {
				return err
			}
			res, err := b.measure(c.Context(), e)
			if err != nil {
				return err
			}
			fmt.Fprintln(e.out, res.JSON())
			return nil
		},
	}
	b.flags(cmd.Flags())
	return cmd
}

func allCmd(e *env) *cobra.Command {
	var out, only string
	cmd := &cobra.Command{
		Use:   "all",
		Short: "Run every benchmark in turn and write their JSON lines to a file",
		Long: `Runs boot, api, scheduler, warm, ingress and policy one after another at
their default sizes (or --smoke's), each with its own progress on stdout,
and appends each one's JSON line to --out as it finishes. A benchmark that
fails gets a line with "error" and the others still run; the exit status
is then 1. Compare two such files with 'hearth-bench compare A B'.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			var w io.Writer = io.Discard
			if out != "" {
				f, err := os.Create(out)
				if err != nil {
					return err
				}
				defer f.Close()
				w = f
			}
			var failed []string
			for _, b := range benchmarks() {
				if only != "" && !strings.Contains(","+only+",", ","+b.name+",") {
					continue
				}
				fs := pflag.NewFlagSet(b.name, pflag.ContinueOnError)
				b.flags(fs)
				if err := b.prepare(fs, e.smoke); err != nil {
					return err
				}
				fmt.Fprintf(e.out, "== %s\n", b.name)
				t0 := time.Now()
				res, err := b.measure(c.Context(), e)
				if err != nil {
					res = &bench.Result{Bench: b.name, Smoke: e.smoke, Error: err.Error()}
					failed = append(failed, b.name)
					fmt.Fprintf(e.out, "%s failed: %v\n", b.name, err)
				}
				fmt.Fprintln(e.out, res.JSON())
				fmt.Fprintf(e.out, "== %s took %s\n", b.name, time.Since(t0).Round(time.Second))
				if _, err := fmt.Fprintln(w, res.JSON()); err != nil {
					return err
				}
				if c.Context().Err() != nil {
					return c.Context().Err()
				}
			}
			if len(failed) > 0 {
				return fmt.Errorf("failed: %s", strings.Join(failed, ", "))
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&out, "out", "o", "", "write the JSON lines to this file")
	cmd.Flags().StringVar(&only, "only", "", "run only these benchmarks (comma-separated names)")
	return cmd
}

func compareCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "compare A.jsonl B.jsonl",
		Short: "Print the ratios of two runs side by side",
		Long: `Reads two files of benchmark JSON lines ('hearth-bench all --out', or any
benchmark's output: other lines are skipped) and prints every figure's
ratio to its baseline in A and in B, and B's over A's. Ratios, not times:
each was measured against a baseline in its own run, so two runs on
different days or machines compare. VERDICT names changes beyond 5%.`,
		Args: cobra.ExactArgs(2),
		RunE: func(c *cobra.Command, args []string) error {
			var runs [2][]bench.Result
			for i, path := range args {
				rs, err := bench.ReadResults(path)
				if err != nil {
					return err
				}
				if len(rs) == 0 {
					return fmt.Errorf("%s: no benchmark results (JSON lines with a \"bench\" key)", path)
				}
				runs[i] = rs
			}
			return bench.Compare(c.OutOrStdout(), runs[0], runs[1])
		},
	}
}
