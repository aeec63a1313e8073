package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/util/exec"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/sandboxapi"
	"hearth.dev/hearth/internal/scheme"
)

// api is a connection to a hearth API server.
type api struct {
	cfg    *rest.Config
	client client.Client
	ns     string
}

// kubeconfig is the kubeconfig hearth's API commands use: --kubeconfig,
// else $KUBECONFIG; "" when none is configured (hearth run then runs
// locally).
func (g *globals) kubeconfig() string {
	if g.kubeconfigPath != "" {
		return g.kubeconfigPath
	}
	return os.Getenv("KUBECONFIG")
}

func (g *globals) api() (*api, error) {
	path := g.kubeconfig()
	if path == "" {
		return nil, errors.New("no hearth API configured: start one with `hearth up` and export KUBECONFIG=DATA-DIR/kubeconfig, or pass --kubeconfig")
	}
	loader := &clientcmd.ClientConfigLoadingRules{ExplicitPath: path}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(loader, &clientcmd.ConfigOverrides{})
	cfg, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	ns := g.namespace
	if ns == "" {
		if ns, _, err = cc.Namespace(); err != nil || ns == "" {
			ns = "default"
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme.Scheme})
	if err != nil {
		return nil, err
	}
	return &api{cfg: cfg, client: c, ns: ns}, nil
}

func (a *api) get(ctx context.Context, name string) (*v1alpha1.Sandbox, error) {
	var sb v1alpha1.Sandbox
	if err := a.client.Get(ctx, types.NamespacedName{Namespace: a.ns, Name: name}, &sb); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("sandbox %q not found in namespace %s", name, a.ns)
		}
		return nil, err
	}
	return &sb, nil
}

// streamRequest is the API request for a sandbox's stream subresource.
// logs copies a sandbox's output; with follow until its run ends.
func (a *api) logs(ctx context.Context, name string, follow, previous bool, out io.Writer) error {
	req, err := sandboxapi.Request(a.cfg, http.MethodGet, a.ns, name, "log")
	if err != nil {
		return err
	}
	req = req.Param("follow", fmt.Sprint(follow)).Param("previous", fmt.Sprint(previous))
	rc, err := req.Stream(ctx)
	if err != nil {
		return err
	}
	defer rc.Close()
	_, err = io.Copy(out, rc)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// stream runs exec or attach in the sandbox name.
func (a *api) stream(ctx context.Context, name, sub string, command []string, tty bool, stdin io.Reader, stdout, stderr io.Writer, sizes remotecommand.TerminalSizeQueue) error {
	return sandboxapi.Stream(ctx, a.cfg, a.ns, name, sub, command, tty, stdin, stdout, stderr, sizes)
}

// exitStatus turns a remote command's error into hearth's exit status.
func exitStatus(err error) error {
	var ce exec.CodeExitError
	if errors.As(err, &ce) {
		return &ExitError{Code: ce.Code}
	}
	return err
}

func psCmd(g *globals) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List sandboxes (through the API)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			var list v1alpha1.SandboxList
			opts := []client.ListOption{client.InNamespace(a.ns)}
			if all {
				opts = nil
			}
			if err := a.client.List(cmd.Context(), &list, opts...); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "NAMESPACE\tNAME\tPHASE\tEXIT\tHOST\tIMAGE\tAGE")
			for _, sb := range list.Items {
				exit := ""
				if sb.Status.ExitCode != nil {
					exit = fmt.Sprint(*sb.Status.ExitCode)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", sb.Namespace, sb.Name, orDash(string(sb.Status.Phase)), orDash(exit),
					orDash(sb.Status.HostName), sb.Spec.Image, duration.HumanDuration(time.Since(sb.CreationTimestamp.Time)))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all-namespaces", "A", false, "list the sandboxes of every namespace")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func getCmd(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "get NAME",
		Short: "Show a sandbox (through the API) as YAML or JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			sb, err := a.get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			sb.APIVersion, sb.Kind = v1alpha1.GroupVersion.String(), "Sandbox"
			sb.ManagedFields = nil
			var b []byte
			switch output {
			case "yaml":
				b, err = yaml.Marshal(sb)
			case "json":
				b, err = json.MarshalIndent(sb, "", "  ")
				b = append(b, '\n')
			default:
				return fmt.Errorf("-o %q: want yaml or json", output)
			}
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "yaml", "yaml or json")
	return cmd
}

func logsCmd(g *globals) *cobra.Command {
	var follow, previous bool
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a sandbox's output (through the API)",
		Long: `Print the output of a sandbox's current run, kept on its host (capped and
rotated). -f follows it until the run ends; --previous prints the run before,
for sandboxes that restart.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			if _, err := a.get(cmd.Context(), args[0]); err != nil {
				return err
			}
			return a.logs(cmd.Context(), args[0], follow, previous, cmd.OutOrStdout())
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "follow the output until the run ends")
	cmd.Flags().BoolVar(&previous, "previous", false, "the previous run's output")
	return cmd
}

func execCmd(g *globals) *cobra.Command {
	var interactive, tty bool
	cmd := &cobra.Command{
		Use:   "exec [flags] NAME -- COMMAND [ARG...]",
		Short: "Run a command in a running sandbox (through the API)",
		Long: `Run COMMAND in the running sandbox NAME, with the workload's environment,
user and working directory, as docker exec does. Its exit status is the
command's.`,
		Example: `  hearth exec job-1 -- cat /etc/os-release
  hearth exec -it job-1 -- sh`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			name, command := args[0], args[1:]
			if command[0] == "--" {
				command = command[1:]
			}
			if len(command) == 0 {
				return errors.New("no command given: hearth exec NAME -- COMMAND [ARG...]")
			}
			if _, err := a.get(cmd.Context(), name); err != nil {
				return err
			}
			return exitStatus(a.interact(cmd, name, "exec", command, interactive, tty))
		},
	}
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().BoolVarP(&interactive, "interactive", "i", false, "forward stdin")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "give the command a terminal")
	return cmd
}

// interact runs exec or attach with this terminal: raw mode and window
// sizes with a TTY.
func (a *api) interact(cmd *cobra.Command, name, sub string, command []string, interactive, tty bool) error {
	var stdin io.Reader
	if interactive {
		stdin = cmd.InOrStdin()
	}
	in, _ := cmd.InOrStdin().(*os.File)
	isTerm := in != nil && term.IsTerminal(int(in.Fd()))
	if tty && !isTerm {
		if interactive {
			return errors.New("the input device is not a TTY: drop -t, or run from a terminal")
		}
		tty = false
	}
	var sizes remotecommand.TerminalSizeQueue
	if tty {
		fd := int(in.Fd())
		if interactive {
			old, err := term.MakeRaw(fd)
			if err != nil {
				return err
			}
			defer term.Restore(fd, old)
		}
		sizes = newSizeQueue(cmd.Context(), fd)
	}
	return a.stream(cmd.Context(), name, sub, command, tty, stdin, cmd.OutOrStdout(), cmd.ErrOrStderr(), sizes)
}

func rmCmd(g *globals) *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Delete sandboxes (through the API), stopping their VMs",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			return forEachName(cmd, args, func(name string) error { return a.remove(cmd.Context(), name, wait) })
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", true, "return once the VM is gone and the object deleted")
	return cmd
}

// forEachName runs f for each name, printing the names it succeeded for,
// and returns every failure.
func forEachName(cmd *cobra.Command, names []string, f func(name string) error) error {
	var errs []error
	for _, name := range names {
		if err := f(name); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintln(cmd.OutOrStdout(), name)
	}
	return errors.Join(errs...)
}

// remove deletes a sandbox and, with wait, waits until it is gone.
func (a *api) remove(ctx context.Context, name string, wait bool) error {
	sb := &v1alpha1.Sandbox{ObjectMeta: metav1.ObjectMeta{Namespace: a.ns, Name: name}}
	if err := a.client.Delete(ctx, sb); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("sandbox %q not found in namespace %s", name, a.ns)
		}
		return err
	}
	for wait {
		if err := a.client.Get(ctx, client.ObjectKeyFromObject(sb), sb); apierrors.IsNotFound(err) {
			return nil
		} else if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// runRemote is hearth run through the API: create a Sandbox, stream its
// output, wait for its end, delete it (unless --detach).
func runRemote(cmd *cobra.Command, g *globals, f *runFlags, spec sandbox.Spec, src *v1alpha1.SandboxSource) error {
	a, err := g.api()
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	sb := &v1alpha1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{Namespace: a.ns, Name: spec.Name},
		Spec: v1alpha1.SandboxSpec{
			Image: spec.Image, Args: spec.Command, WorkingDir: spec.WorkingDir, User: spec.User,
			Stdin: spec.Stdin, StdinOnce: spec.Stdin, TTY: spec.TTY,
			Resources: v1alpha1.Resources{
				CPU:    resource.NewQuantity(int64(spec.CPUs), resource.DecimalSI),
				Memory: resource.NewQuantity(int64(spec.MemoryMiB)<<20, resource.BinarySI),
				Disk:   resource.NewQuantity(int64(spec.DiskMiB)<<20, resource.BinarySI),
			},
			RestartPolicy: v1alpha1.RestartNever,
			Source:        src,
		},
	}
	if src != nil {
		// The source's VM has its own size; a sandbox made from it
		// requests what the flags say only when given.
		fl := cmd.Flags()
		r := &sb.Spec.Resources
		if !fl.Changed("cpus") {
			r.CPU = nil
		}
		if !fl.Changed("memory") {
			r.Memory = nil
		}
		if !fl.Changed("disk") {
			r.Disk = nil
		}
	}
	if sb.Name == "" {
		sb.GenerateName = "run-"
	}
	for _, kv := range spec.Env {
		k, v, _ := strings.Cut(kv, "=")
		sb.Spec.Env = append(sb.Spec.Env, v1alpha1.EnvVar{Name: k, Value: v})
	}
	if err := a.client.Create(ctx, sb); err != nil {
		return err
	}
	if f.detach {
		fmt.Fprintln(cmd.OutOrStdout(), sb.Name)
		return nil
	}
	// Removed at the end whatever happens, as a local run's VM is.
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if err := a.remove(dctx, sb.Name, true); err != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "hearth: remove sandbox %s: %v\n", sb.Name, err)
		}
	}()
	said := ""
	err = a.waitFor(ctx, sb, func() bool {
		if sb.Status.Reason == "Unschedulable" && sb.Status.Message != said {
			said = sb.Status.Message
			fmt.Fprintf(cmd.ErrOrStderr(), "hearth: sandbox %s waits for a host: %s\n", sb.Name, said)
		}
		return sb.Status.Phase == v1alpha1.PhaseRunning || sb.Status.Phase.Terminal()
	})
	if err != nil {
		return err
	}
	if sb.Status.Phase.Terminal() && sb.Status.StartedAt == nil {
		// It never ran: there is no output to show, only why.
		return &ExitError{Code: int(ptrOr(sb.Status.ExitCode, 125)), Msg: strings.TrimSpace(sb.Status.Reason + ": " + sb.Status.Message)}
	}
	if spec.Stdin {
		// Input through attach; output through the log, which has it
		// all from the start.
		go func() { _ = a.stream(ctx, sb.Name, "attach", nil, false, cmd.InOrStdin(), nil, nil, nil) }()
	}
	if err := a.logs(ctx, sb.Name, true, false, cmd.OutOrStdout()); err != nil {
		return err
	}
	if err := a.waitEnded(ctx, sb); err != nil {
		return err
	}
	code := int(ptrOr(sb.Status.ExitCode, 125))
	if code == 0 {
		return nil
	}
	msg := ""
	if sb.Status.Reason != "Error" && sb.Status.Reason != "" {
		msg = strings.TrimSpace(sb.Status.Reason + ": " + sb.Status.Message)
	}
	return &ExitError{Code: code, Msg: msg}
}

func ptrOr(p *int32, d int32) int32 {
	if p == nil {
		return d
	}
	return *p
}

func (a *api) waitEnded(ctx context.Context, sb *v1alpha1.Sandbox) error {
	return a.waitFor(ctx, sb, func() bool { return sb.Status.Phase.Terminal() })
}

func (a *api) waitFor(ctx context.Context, sb *v1alpha1.Sandbox, done func() bool) error {
	for {
		if err := a.client.Get(ctx, client.ObjectKeyFromObject(sb), sb); err != nil {
			return err
		}
		if done() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
