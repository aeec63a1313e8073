package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

type runFlags struct {
	rm, interactive, tty bool
	local, detach        bool
	env, envFiles        []string
	workdir, user, name  string
	cpus                 int
	memory, disk         string
	accel, pull, kernel  string
	// A source to start from instead of an image (through the API).
	template, snapshot, pool string
}

// source is the sandbox source the flags name, or nil.
func (f *runFlags) source() (*v1alpha1.SandboxSource, error) {
	src := &v1alpha1.SandboxSource{Template: f.template, Snapshot: f.snapshot, WarmPool: f.pool}
	n := 0
	for _, v := range []string{f.template, f.snapshot, f.pool} {
		if v != "" {
			n++
		}
	}
	switch n {
	case 0:
		return nil, nil
	case 1:
		return src, nil
	}
	return nil, errors.New("give one of --template, --snapshot and --pool")
}

func runCmd(g *globals) *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [COMMAND [ARG...]]\n  hearth run [flags] --template NAME|--snapshot NAME|--pool NAME [COMMAND [ARG...]]",
		Short: "Boot a micro-VM from an image and run a command in it",
		Long: `Boot a micro-VM from IMAGE and run COMMAND in it, as docker run does.

IMAGE is a registry reference (localhost:5000/tools:1), an OCI layout
(oci:DIR[:TAG]) or a docker save tarball (docker-archive:FILE[:TAG]).
COMMAND replaces the image's Cmd; the image's Entrypoint, Env, WorkingDir and
User apply unless overridden by flags.

Through the API, --template, --snapshot or --pool start the sandbox from a
SandboxTemplate's snapshot, a Snapshot or a WarmPool's ready sandbox instead
of booting an image: COMMAND, if given, runs in it as the workload (the saved
process runs on beside it); without, the saved workload runs on. A disk-only
snapshot boots the saved sandbox's image with the saved files. A --pool claim
with a COMMAND starts as a fork of the pool's template (the pool's sandboxes
run the template's process).

The exit status is the workload's: 128+N if signal N killed it, 125 if hearth
itself failed, 126 if the command cannot be invoked, 127 if it is not found.
Ctrl-C sends SIGINT to the workload; a second Ctrl-C sends SIGKILL.`,
		Example: `  hearth run localhost:5000/tools:1 -- sh -c 'echo hello; exit 3'
  echo data | hearth run -i localhost:5000/tools:1 -- wc -c
  hearth run --rm -it localhost:5000/tools:1 -- sh
  hearth run --template python -- python3 -c 'print(2+2)'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runRun(cmd, g, f, args)
		},
	}
	fl := cmd.Flags()
	fl.SetInterspersed(false) // flags after IMAGE belong to the command
	fl.BoolVar(&f.rm, "rm", false, "remove the sandbox when it exits (local sandboxes always are)")
	fl.BoolVarP(&f.interactive, "interactive", "i", false, "keep stdin open and forward it to the workload")
	fl.BoolVarP(&f.tty, "tty", "t", false, "give the workload a terminal")
	fl.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable (KEY=VAL, or KEY to pass hearth's own)")
	fl.StringArrayVar(&f.envFiles, "env-file", nil, "read environment variables from a file, one KEY=VAL a line")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working directory inside the sandbox")
	fl.StringVarP(&f.user, "user", "u", "", "user to run as: name, uid, name:group or uid:gid")
	fl.StringVar(&f.name, "name", "", "the sandbox's name (also its hostname)")
	fl.IntVar(&f.cpus, "cpus", 1, "virtual CPUs")
	fl.StringVarP(&f.memory, "memory", "m", "256M", "guest memory (e.g. 256M, 1G)")
	fl.StringVar(&f.disk, "disk", "1G", "size of the writable disk (e.g. 512M, 4G)")
	fl.StringVar(&f.accel, "accel", "auto", "kvm, tcg or auto (KVM where usable)")
	fl.StringVar(&f.pull, "pull", "missing", "pull the image: missing, always or never")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel (default $HEARTH_KERNEL, else the cache's kernel/vmlinux)")
	fl.BoolVar(&f.local, "local", false, "run on this machine even when a hearth API is configured")
	fl.BoolVarP(&f.detach, "detach", "d", false, "through the API: create the sandbox, print its name and return")
	fl.StringVar(&f.template, "template", "", "through the API: start from this SandboxTemplate's snapshot (no IMAGE)")
	fl.StringVar(&f.snapshot, "snapshot", "", "through the API: start from this Snapshot (no IMAGE)")
	fl.StringVar(&f.pool, "pool", "", "through the API: take a ready sandbox of this WarmPool (no IMAGE)")
	return cmd
}

// runtime assembles a sandbox runtime from flags and the environment.
func (g *globals) runtime(accelFlag, pullFlag, kernel string, progress io.Writer, stderr io.Writer) (*sandbox.Runtime, error) {
	accel, err := vmm.ParseAccel(accelFlag)
	if err != nil {
		return nil, err
	}
	pull, err := image.ParsePullPolicy(pullFlag)
	if err != nil {
		return nil, err
	}
	if accel == vmm.TCG && stderr != nil {
		fmt.Fprintln(stderr, "hearth: warning: running under TCG software emulation, which is not a security boundary (no usable KVM on this host)")
	}
	host, err := sandbox.HostFromEnv(kernel)
	if err != nil {
		return nil, err
	}
	return sandbox.NewRuntime(host, g.store(progress), accel, pull, g.log), nil
}

func runRun(cmd *cobra.Command, g *globals, f *runFlags, args []string) error {
	stderr := cmd.ErrOrStderr()
	src, err := f.source()
	if err != nil {
		return err
	}
	var img string
	command := args
	if src == nil {
		if len(args) == 0 {
			return errors.New("give an IMAGE to run, or --template, --snapshot or --pool")
		}
		img, command = args[0], args[1:]
	}
	if len(command) > 0 && command[0] == "--" {
		// With flag parsing stopped at IMAGE, a "--" after it is ours.
		command = command[1:]
	}
	spec := sandbox.Spec{
		Image:      img,
		Command:    command,
		WorkingDir: f.workdir,
		User:       f.user,
		TTY:        f.tty,
		Stdin:      f.interactive,
		CPUs:       f.cpus,
		Name:       f.name,
	}
	if spec.MemoryMiB, err = parseMiB("--memory", f.memory); err != nil {
		return err
	}
	if spec.DiskMiB, err = parseMiB("--disk", f.disk); err != nil {
		return err
	}
	if spec.Env, err = collectEnv(f.envFiles, f.env); err != nil {
		return err
	}
	if src != nil {
		if g.kubeconfig() == "" || f.local {
			return errors.New("--template, --snapshot and --pool start sandboxes through the hearth API: give a --kubeconfig")
		}
		valid := spec
		valid.Image = "-" // the source's
		if err := valid.Validate(); err != nil {
			return err
		}
		return runRemote(cmd, g, f, spec, src)
	}
	if err := spec.Validate(); err != nil {
		return err
	}
	if g.kubeconfig() != "" && !f.local {
		return runRemote(cmd, g, f, spec, nil)
	}
	stdin := cmd.InOrStdin()
	stdinFile, _ := stdin.(*os.File)
	stdinTerm := stdinFile != nil && term.IsTerminal(int(stdinFile.Fd()))
	if f.tty && f.interactive && !stdinTerm {
		return errors.New("the input device is not a TTY: drop -t, or run from a terminal")
	}
	rt, err := g.runtime(f.accel, f.pull, f.kernel, terminalOr(stderr), stderr)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	sigs := make(chan syscall.Signal, 4)
	resize := make(chan protocol.Resize, 4)
	sio := sandbox.IO{Stdin: stdin, Stdout: cmd.OutOrStdout(), Stderr: stderr, Signals: sigs, Resize: resize}

	if f.tty && stdinTerm {
		fd := int(stdinFile.Fd())
		if w, h, err := term.GetSize(fd); err == nil {
			spec.Cols, spec.Rows = uint16(w), uint16(h)
		}
		if f.interactive {
			old, err := term.MakeRaw(fd)
			if err != nil {
				return fmt.Errorf("terminal raw mode: %w", err)
			}
			defer term.Restore(fd, old)
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(fd); err == nil {
					select {
					case resize <- protocol.Resize{Rows: uint16(h), Cols: uint16(w)}:
					default:
					}
				}
			}
		}()
	}

	// Signals to hearth go to the workload once it runs. Before that (a
	// pull, a boot) they cancel the run, which cleans up what was started.
	// Once it runs, a second interrupt, or the workload ignoring SIGTERM for
	// 10 s, ends the VM. SIGPIPE is caught so that a closed stdout is an
	// error that cleans up, not a silent death.
	var started atomic.Bool
	sio.Started = func() { started.Store(true) }
	var interrupted atomic.Value
	osig := make(chan os.Signal, 4)
	signal.Notify(osig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGPIPE)
	defer signal.Stop(osig)
	go func() {
		interrupts := 0
		for s := range osig {
			sig := s.(syscall.Signal)
			if sig == syscall.SIGPIPE {
				continue
			}
			if !started.Load() {
				interrupted.Store(sig)
				cancel()
				continue
			}
			interrupts++
			if interrupts > 1 {
				sig = syscall.SIGKILL
			}
			select {
			case sigs <- sig:
			default:
			}
			if sig == syscall.SIGTERM || sig == syscall.SIGKILL {
				time.AfterFunc(10*time.Second, cancel)
			}
		}
	}()

	res, err := rt.Run(ctx, spec, sio)
	if err != nil {
		if sig, ok := interrupted.Load().(syscall.Signal); ok {
			return &ExitError{Code: 128 + int(sig), Msg: "interrupted before the workload started; nothing was left running"}
		}
		if errors.Is(err, syscall.EPIPE) {
			// Whoever read our output has gone, as with `| head`: end
			// like any Unix program whose reader left.
			return &ExitError{Code: 128 + int(syscall.SIGPIPE)}
		}
		if ctx.Err() != nil && cmd.Context().Err() == nil {
			return &ExitError{Code: 128 + int(syscall.SIGKILL), Msg: "the workload did not stop; its VM was killed"}
		}
		return err
	}
	return resultError(res, spec)
}

// resultError turns a workload's ending into hearth's exit status and, where
// the reason is not the workload's own, a message.
func resultError(res *sandbox.Result, spec sandbox.Spec) error {
	var msgs []string
	if res.Error != "" {
		msgs = append(msgs, res.Error)
	}
	if res.OOM && res.Signal == int(syscall.SIGKILL) {
		msgs = append(msgs, fmt.Sprintf("the workload was killed by the guest's OOM killer: it ran out of memory (--memory %dM)", spec.MemoryMiB))
	}
	if res.DiskFull {
		msgs = append(msgs, fmt.Sprintf("the sandbox's writable disk is full (--disk %dM)", spec.DiskMiB))
	}
	if res.ExitCode == 0 && len(msgs) == 0 {
		return nil
	}
	return &ExitError{Code: res.ExitCode, Msg: strings.Join(msgs, "; ")}
}

// parseMiB parses a size such as 256M, 1G, 1GiB or 512m into MiB. A bare
// number is bytes, as in docker.
func parseMiB(flag, s string) (int, error) {
	t := strings.TrimSpace(strings.ToLower(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "b"), "i")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k':
			mult, t = 1<<10, t[:n-1]
		case 'm':
			mult, t = 1<<20, t[:n-1]
		case 'g':
			mult, t = 1<<30, t[:n-1]
		case 't':
			mult, t = 1<<40, t[:n-1]
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%s %q: want a size such as 256M or 1G", flag, s)
	}
	return int(v * float64(mult) / (1 << 20)), nil
}

// collectEnv reads --env-file files, then --env flags, in order: later
// settings win. "KEY" alone takes hearth's own value of KEY, if set.
func collectEnv(files, flags []string) ([]string, error) {
	var out []string
	add := func(kv string) {
		if !strings.Contains(kv, "=") {
			if v, ok := os.LookupEnv(kv); ok {
				out = append(out, kv+"="+v)
			}
			return
		}
		out = append(out, kv)
	}
	for _, path := range files {
		fh, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("--env-file: %w", err)
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			add(line)
		}
		err = sc.Err()
		fh.Close()
		if err != nil {
			return nil, fmt.Errorf("--env-file %s: %w", path, err)
		}
	}
	for _, kv := range flags {
		if strings.HasPrefix(kv, "=") {
			return nil, fmt.Errorf("--env %q: no variable name", kv)
		}
		add(kv)
	}
	return out, nil
}
