package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/migration"
	"hearth.dev/hearth/internal/pki"
)

func hostCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host",
		Short: "Manage hosts: cordon, uncordon, drain, join credentials",
	}
	cordon := func(use, short string, unschedulable bool) *cobra.Command {
		return &cobra.Command{
			Use:   use + " NAME...",
			Short: short,
			Args:  cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				a, err := g.api()
				if err != nil {
					return err
				}
				for _, name := range args {
					if err := a.setUnschedulable(cmd.Context(), name, unschedulable); err != nil {
						return err
					}
					fmt.Fprintf(cmd.OutOrStdout(), "host/%s %sed\n", name, use)
				}
				return nil
			},
		}
	}
	cmd.AddCommand(
		cordon("cordon", "Keep new sandboxes off a host; those on it keep running", true),
		cordon("uncordon", "Let the scheduler place sandboxes on a host again", false),
		drainCmd(g), credentialsCmd())
	return cmd
}

func (a *api) setUnschedulable(ctx context.Context, name string, v bool) error {
	h := &v1alpha1.Host{}
	if err := a.client.Get(ctx, types.NamespacedName{Name: name}, h); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("host %q not found", name)
		}
		return err
	}
	patch := client.MergeFrom(h.DeepCopy())
	h.Spec.Unschedulable = v
	return a.client.Patch(ctx, h, patch)
}

func drainCmd(g *globals) *cobra.Command {
	var timeout time.Duration
	var migrate bool
	cmd := &cobra.Command{
		Use:   "drain NAME",
		Short: "Cordon a host and move its running sandboxes to other hosts",
		Long: `Cordons the host, then moves each sandbox that has not ended to another host:
a running one that can migrate is migrated (a Migration: it runs on there,
not restarted); the others, and those whose migration fails, are stopped
and given back to the scheduler, which places each on another host where it
starts again from its image. It says which. Sandboxes of a host that is not
ready are given back at once. Waits until none is left on the host, or
--timeout.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			name := args[0]
			if err := a.setUnschedulable(ctx, name, true); err != nil {
				return err
			}
			var h v1alpha1.Host
			if err := a.client.Get(ctx, types.NamespacedName{Name: name}, &h); err != nil {
				return err
			}
			ready := meta.IsStatusConditionTrue(h.Status.Conditions, v1alpha1.HostConditionReady)
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "host/%s cordoned\n", name)
			asked := map[types.UID]bool{}
			moving := map[types.UID]string{} // sandbox → its migration
			for {
				left, err := a.sandboxesOn(ctx, name)
				if err != nil {
					return err
				}
				if len(left) == 0 {
					fmt.Fprintf(out, "host/%s drained\n", name)
					return nil
				}
				for i := range left {
					sb := &left[i]
					if asked[sb.UID] {
						continue
					}
					why := ""
					if m, ok := moving[sb.UID]; ok {
						if why = a.migrationFailed(ctx, sb.Namespace, m); why == "" {
							continue // under way
						}
					} else if ready && migrate {
						reason, refusal := migration.Refusal(sb)
						if reason == "" {
							m, err := a.startMigration(ctx, sb)
							if err != nil {
								return fmt.Errorf("migrate %s/%s: %w", sb.Namespace, sb.Name, err)
							}
							moving[sb.UID] = m
							fmt.Fprintf(out, "migrating sandbox %s/%s (migration %s)\n", sb.Namespace, sb.Name, m)
							continue
						}
						why = "it cannot migrate: " + refusal
					}
					if err := a.evict(ctx, sb, name, ready); err != nil {
						return fmt.Errorf("evict %s/%s: %w", sb.Namespace, sb.Name, err)
					}
					asked[sb.UID] = true
					if why != "" {
						why = " (" + why + ")"
					}
					fmt.Fprintf(out, "evicting sandbox %s/%s to restart it elsewhere%s\n", sb.Namespace, sb.Name, why)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("host %s still has %d sandboxes after %s", name, len(left), timeout)
				case <-time.After(200 * time.Millisecond):
				}
			}
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	cmd.Flags().BoolVar(&migrate, "migrate", true, "migrate the sandboxes that can be (false: restart every one elsewhere)")
	return cmd
}

// startMigration creates a Migration of sb to a host the scheduler picks,
// and returns its name.
func (a *api) startMigration(ctx context.Context, sb *v1alpha1.Sandbox) (string, error) {
	m := &v1alpha1.Migration{ObjectMeta: metav1.ObjectMeta{Namespace: sb.Namespace, GenerateName: sb.Name + "-drain-"},
		Spec: v1alpha1.MigrationSpec{Sandbox: sb.Name}}
	if err := a.client.Create(ctx, m); err != nil {
		return "", err
	}
	return m.Name, nil
}

// migrationFailed says why the migration failed ("": it has not).
func (a *api) migrationFailed(ctx context.Context, namespace, name string) string {
	var m v1alpha1.Migration
	if err := a.client.Get(ctx, types.NamespacedName{Namespace: namespace, Name: name}, &m); err != nil {
		if apierrors.IsNotFound(err) {
			return "its migration " + name + " was deleted"
		}
		return "" // asked again in a moment
	}
	if m.Status.Phase == v1alpha1.MigrationFailed {
		return fmt.Sprintf("its migration %s failed: %s: %s", name, m.Status.Reason, m.Status.Message)
	}
	return ""
}

// sandboxesOn lists the sandboxes bound to a host that have not ended.
func (a *api) sandboxesOn(ctx context.Context, host string) ([]v1alpha1.Sandbox, error) {
	var list v1alpha1.SandboxList
	if err := a.client.List(ctx, &list, client.MatchingFields{"status.hostName": host}); err != nil {
		return nil, err
	}
	var out []v1alpha1.Sandbox
	for _, sb := range list.Items {
		if !sb.Status.Phase.Terminal() && sb.DeletionTimestamp.IsZero() {
			out = append(out, sb)
		}
	}
	return out, nil
}

// evict asks the host's agent to stop the sandbox and give it back to the
// scheduler (the Evicting condition); a host that is not ready cannot, so
// the sandbox is given back directly.
func (a *api) evict(ctx context.Context, sb *v1alpha1.Sandbox, host string, ready bool) error {
	patch := client.MergeFromWithOptions(sb.DeepCopy(), client.MergeFromWithOptimisticLock{})
	if ready {
		meta.SetStatusCondition(&sb.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionEvicting, Status: metav1.ConditionTrue,
			Reason: "Drain", Message: "host " + host + " is being drained"})
	} else {
		sb.Status.Unbind("Evicted", fmt.Sprintf("evicted from host %s (drained while not ready); placing the sandbox again", host))
	}
	err := a.client.Status().Patch(ctx, sb, patch)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func credentialsCmd() *cobra.Command {
	var dataDir, address, out string
	cmd := &cobra.Command{
		Use:   "credentials NAME --address IP --out DIR",
		Short: "Issue the certificates a node agent on another machine joins with",
		Long: `Run on the control plane (it needs the CA key in --data-dir). Writes the
cluster's CA certificate and the node's client and serving certificates
under DIR/pki. Copy DIR to the new host and start it there with

  hearthd --roles node --data-dir DIR --node-name NAME \
    --node-listen IP:10250 --server https://CONTROL-PLANE:6443`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if address == "" || out == "" {
				return fmt.Errorf("--address and --out are required")
			}
			ca, err := pki.LoadCA(filepath.Join(dataDir, "pki"), true)
			if err != nil {
				return err
			}
			streamsCA, err := pki.LoadCA(filepath.Join(dataDir, "pki", pki.StreamsDir), true)
			if err != nil {
				return err
			}
			// The API's CA for its client certificate, the streams' for
			// its serving one.
			for _, c := range []struct {
				ca  *pki.CA
				dir string
				req pki.Request
			}{{ca, filepath.Join(out, "pki"), pki.NodeClientRequest(args[0])},
				{streamsCA, filepath.Join(out, "pki", pki.StreamsDir), pki.NodeServingRequest(args[0], address)}} {
				issuer, err := c.ca.Issuer(c.dir)
				if err != nil {
					return err
				}
				if _, err := issuer.Ensure(c.req); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "credentials of host %s in %s\n", args[0], filepath.Join(out, "pki"))
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", config.DataDir(), "the control plane's data directory")
	cmd.Flags().StringVar(&address, "address", "", "the address the new host's node agent serves streams at (in its certificate)")
	cmd.Flags().StringVar(&out, "out", "", "where to write the credentials")
	return cmd
}
