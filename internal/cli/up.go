package cli

import (
	"os"
	"syscall"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/config"
)

// upCmd runs hearthd in hearth's place. The CLI does not link the daemon
// (etcd, the API server, the controllers): their package initialisation
// alone was two thirds of every hearth command's start-up, `hearth run`'s
// included.
func upCmd(*globals) *cobra.Command {
	return &cobra.Command{
		Use:   "up [FLAGS]",
		Short: "Run an all-in-one hearth in the foreground: etcd, the API server, the scheduler and a node agent (runs hearthd)",
		Long: `Run the whole of hearth on this machine, in the foreground, until Ctrl-C or
SIGTERM: an embedded etcd member, the Kubernetes API server serving
hearth.dev/v1alpha1 Sandboxes and Hosts, the scheduler, and a node agent that
boots the sandboxes bound to this host.

It writes DATA-DIR/kubeconfig (an admin client certificate from the CA it
generates in DATA-DIR/pki) for kubectl and for hearth's own commands.
Restarting it keeps every object; running sandboxes keep running.

'hearth up' is hearthd (found beside hearth, on PATH or in $HEARTH_HEARTHD)
with the same flags, in hearth's place: 'hearth up --help' lists them.

'hearth up' is for development: it adds --allow-tcg, so that on a host
without usable KVM guests run under TCG software emulation (no security
boundary; hearthd says so when it starts). A production node runs hearthd
without that flag, and refuses to start where KVM is unusable.`,
		DisableFlagParsing: true,
		RunE: func(_ *cobra.Command, args []string) error {
			bin, err := config.Hearthd()
			if err != nil {
				return err
			}
			// exec: hearthd is this process from here on (its pid, its
			// signals, its exit status). Flags given later win, so
			// --allow-tcg=false in args still refuses TCG.
			return syscall.Exec(bin, append([]string{"hearthd", "--allow-tcg"}, args...), os.Environ())
		},
	}
}
