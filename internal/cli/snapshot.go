package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/duration"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"hearth.dev/hearth/api/v1alpha1"
)

func snapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Save running sandboxes, list and delete their snapshots (through the API)",
		Long: `A snapshot saves a running sandbox on its host: its memory, devices and
writable disk, or with --disk-only its writable disk alone. Start sandboxes
from one with 'hearth run --snapshot NAME' (or spec.source.snapshot): from a
full snapshot each runs on from where the original was (a fork, in
milliseconds); from a disk-only one each boots afresh with its files.`,
	}
	cmd.AddCommand(snapshotCreateCmd(g), snapshotLsCmd(g), snapshotRmCmd(g))
	return cmd
}

func snapshotCreateCmd(g *globals) *cobra.Command {
	var name string
	var diskOnly, wait bool
	cmd := &cobra.Command{
		Use:     "create SANDBOX",
		Short:   "Save a running sandbox",
		Example: "  hearth snapshot create --name warm-shell my-sandbox\n  hearth snapshot create --disk-only my-sandbox",
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
			if sb.Status.Phase != v1alpha1.PhaseRunning {
				return fmt.Errorf("sandbox %s is %s: only a running sandbox can be saved", sb.Name, orDash(string(sb.Status.Phase)))
			}
			s := &v1alpha1.Snapshot{
				ObjectMeta: metav1.ObjectMeta{Namespace: a.ns, Name: name},
				Spec:       v1alpha1.SnapshotSpec{Sandbox: sb.Name, DiskOnly: diskOnly},
			}
			if name == "" {
				s.GenerateName = sb.Name + "-"
			}
			if err := a.client.Create(ctx, s); err != nil {
				return err
			}
			if !wait {
				fmt.Fprintln(cmd.OutOrStdout(), s.Name)
				return nil
			}
			if err := waitSnapshot(ctx, a, s); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n", s.Name)
			fmt.Fprintf(cmd.ErrOrStderr(), "hearth: saved %s on host %s in %d ms (%s)\n", sb.Name, s.Status.HostName,
				s.Status.Millis, humanBytes(s.Status.SizeBytes))
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the snapshot's name (default: the sandbox's and a suffix)")
	cmd.Flags().BoolVar(&diskOnly, "disk-only", false, "save the writable disk alone")
	cmd.Flags().BoolVar(&wait, "wait", true, "wait until it is taken")
	return cmd
}

// waitSnapshot waits until s is taken or has failed.
func waitSnapshot(ctx context.Context, a *api, s *v1alpha1.Snapshot) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		if err := a.client.Get(ctx, client.ObjectKeyFromObject(s), s); err != nil {
			return err
		}
		switch s.Status.Phase {
		case v1alpha1.SnapshotReady:
			return nil
		case v1alpha1.SnapshotFailed:
			return fmt.Errorf("snapshot %s failed: %s", s.Name, s.Status.Message)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("snapshot %s: %w (%s)", s.Name, ctx.Err(), orDash(s.Status.Message))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func snapshotLsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List snapshots",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			var list v1alpha1.SnapshotList
			if err := a.client.List(cmd.Context(), &list, client.InNamespace(a.ns)); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSANDBOX\tKIND\tPHASE\tHOST\tSIZE\tAGE")
			for _, s := range list.Items {
				kind := "memory+disk"
				if s.Spec.DiskOnly {
					kind = "disk"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.Spec.Sandbox, kind, orDash(string(s.Status.Phase)),
					orDash(s.Status.HostName), humanBytes(s.Status.SizeBytes),
					duration.HumanDuration(time.Since(s.CreationTimestamp.Time)))
			}
			return tw.Flush()
		},
	}
}

func snapshotRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Delete snapshots, freeing their space on the host",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.api()
			if err != nil {
				return err
			}
			return forEachName(cmd, args, func(name string) error {
				s := &v1alpha1.Snapshot{ObjectMeta: metav1.ObjectMeta{Namespace: a.ns, Name: name}}
				err := a.client.Delete(cmd.Context(), s)
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("snapshot %q not found in namespace %s", name, a.ns)
				}
				return err
			})
		},
	}
}
