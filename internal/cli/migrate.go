package cli

import (
	"context"
	"errors"
	"fmt"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
)

func migrateCmd(g *globals) *cobra.Command {
	var to string
	var wait bool
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "migrate SANDBOX",
		Short: "Move a running sandbox to another host (through the API)",
		Long: `Moves a running sandbox to another host: its memory, devices and writable
disk are copied to a VM there and it runs on after a short pause. Without
--to the scheduler picks the host. It creates a Migration (kubectl get
migrations) and, with --wait, follows it to its end; Ctrl-C before the
switch deletes the Migration, which cancels it (the sandbox runs on where it
was).

Until addresses follow their sandboxes between hosts, the sandbox takes an
address of the new host's range (its connections break); sandboxes started
from a snapshot, template or warm pool cannot migrate yet (docs/migration.md).`,
		Example: "  hearth migrate job-1 --to host-2\n  hearth migrate job-1",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			sb, err := a.get(ctx, args[0])
			if err != nil {
				return err
			}
			m := &v1alpha1.Migration{
				ObjectMeta: metav1.ObjectMeta{Namespace: a.ns, GenerateName: sb.Name + "-"},
				Spec:       v1alpha1.MigrationSpec{Sandbox: sb.Name, TargetHost: to},
			}
			if err := a.client.Create(ctx, m); err != nil {
				return err
			}
			if !wait {
				fmt.Fprintln(cmd.OutOrStdout(), m.Name)
				return nil
			}
			sigCtx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			err = waitMigration(sigCtx, a, m, timeout, func(p v1alpha1.MigrationPhase) {
				fmt.Fprintf(cmd.ErrOrStderr(), "hearth: migration %s: %s\n", m.Name, p)
			})
			if sigCtx.Err() != nil && ctx.Err() == nil && !m.Status.Phase.Terminal() {
				// Interrupted: cancel it, as the help says.
				dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if derr := a.client.Delete(dctx, m); derr != nil {
					return fmt.Errorf("interrupted, and the migration %s could not be cancelled: %w", m.Name, derr)
				}
				return fmt.Errorf("interrupted: migration %s cancelled", m.Name)
			}
			if err != nil {
				return err
			}
			st := m.Status
			fmt.Fprintln(cmd.OutOrStdout(), m.Name)
			fmt.Fprintf(cmd.ErrOrStderr(), "hearth: moved %s from %s to %s in %d ms (paused %d ms, %s, %d rounds)\n",
				sb.Name, st.SourceHost, st.TargetHost, st.TotalMillis, st.DowntimeMillis, humanBytes(st.Bytes), st.Rounds)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the host to move it to (default: the scheduler's choice)")
	cmd.Flags().BoolVar(&wait, "wait", true, "follow the migration to its end")
	cmd.Flags().DurationVar(&timeout, "timeout", 15*time.Minute, "how long to wait for it with --wait")
	return cmd
}

// waitMigration follows m until it ends, telling each new phase; a failed
// one is an error with its reason.
func waitMigration(ctx context.Context, a *api, m *v1alpha1.Migration, timeout time.Duration, phase func(v1alpha1.MigrationPhase)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last v1alpha1.MigrationPhase
	for {
		if err := a.client.Get(ctx, client.ObjectKeyFromObject(m), m); err != nil {
			return err
		}
		if p := m.Status.Phase; p != last && p != "" {
			last = p
			phase(p)
		}
		switch m.Status.Phase {
		case v1alpha1.MigrationSucceeded:
			// The switch is done; the sandbox is bound to the target
			// once the control plane has seen it.
			if m.Status.TotalMillis > 0 {
				return nil
			}
		case v1alpha1.MigrationFailed:
			return fmt.Errorf("migration %s failed: %s: %s", m.Name, m.Status.Reason, m.Status.Message)
		}
		select {
		case <-ctx.Done():
			return errors.Join(fmt.Errorf("migration %s: %s", m.Name, orDash(string(m.Status.Phase))), ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
