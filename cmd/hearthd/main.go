// Command hearthd is hearth's daemon: the control plane (embedded etcd, the
// Kubernetes API server, the scheduler) and the node agent that runs
// sandboxes in micro-VMs, in one process or spread over machines by --roles.
// `hearth up` runs it.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/cli"
	"hearth.dev/hearth/internal/hearthd"
)

var version = "dev"

func main() {
	cli.Version = version
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	var (
		o        hearthd.Options
		logLevel string
		log      *slog.Logger
	)
	root := &cobra.Command{
		Use:   "hearthd",
		Short: "hearth's daemon: control plane and node agent",
		Long: `hearthd runs hearth's roles: control-plane (embedded etcd, the Kubernetes API
server, the scheduler) and node (the agent that boots this host's sandboxes).
With no --roles it runs both, as 'hearth up' does.

It writes DATA-DIR/kubeconfig (an admin client certificate from the CA it
generates in DATA-DIR/pki) for kubectl and for hearth's own commands.
Restarting it keeps every object; running sandboxes keep running.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) (err error) {
			log, err = cli.NewLogger(logLevel, stderr)
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Version = cli.Version
			return serve(cmd.Context(), log, o, cmd.OutOrStdout())
		},
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	o.AddFlags(root.Flags())
	root.AddCommand(cli.VersionCmd())
	return cli.Finish(root.Execute(), stderr)
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
