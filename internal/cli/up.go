package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/hearthd"
)

func upCmd(g *globals) *cobra.Command {
	var o hearthd.Options
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run an all-in-one hearth in the foreground: etcd, the API server, the scheduler and a node agent",
		Long: `Run the whole of hearth on this machine, in the foreground, until Ctrl-C or
SIGTERM: an embedded etcd member, the Kubernetes API server serving
hearth.dev/v1alpha1 Sandboxes and Hosts, the scheduler, and a node agent that
boots the sandboxes bound to this host.

It writes DATA-DIR/kubeconfig (an admin client certificate from the CA it
generates in DATA-DIR/pki) for kubectl and for hearth's own commands.
Restarting it keeps every object; running sandboxes keep running.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Version = Version
			return serve(cmd.Context(), g.log, o, cmd.OutOrStdout())
		},
	}
	o.AddFlags(cmd.Flags())
	return cmd
}

// serve runs hearthd until SIGINT or SIGTERM.
func serve(ctx context.Context, log *slog.Logger, o hearthd.Options, out io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	hearthd.RouteKlog(log)
	return hearthd.Run(ctx, log, o, func(kubeconfig string) {
		if kubeconfig == "" {
			fmt.Fprintln(out, "hearth node agent is up")
			return
		}
		fmt.Fprintf(out, "hearth is up. Use it with:\n\n  export KUBECONFIG=%s\n  kubectl get hosts,sandboxes\n  kubectl apply -f examples/sandbox.yaml\n  hearth logs -f job-1; hearth exec -it job-1 -- sh\n\nCtrl-C stops it; sandboxes keep running and are re-adopted at the next start.\n", kubeconfig)
	})
}

// HearthdMain is the hearthd command.
func HearthdMain(args []string, stdout, stderr io.Writer) int {
	g := &globals{}
	var o hearthd.Options
	root := &cobra.Command{
		Use:   "hearthd",
		Short: "hearth's daemon: control plane and node agent",
		Long: `hearthd runs hearth's roles: control-plane (embedded etcd, the Kubernetes API
server, the scheduler) and node (the agent that boots this host's sandboxes).
With no --roles it runs both, as 'hearth up' does.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return g.setupLog(stderr)
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Version = Version
			return serve(cmd.Context(), g.log, o, cmd.OutOrStdout())
		},
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	o.AddFlags(root.Flags())
	root.AddCommand(versionCmd())
	return finish(root.Execute(), stderr)
}
