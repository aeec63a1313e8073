package cli

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/image"
)

func imageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Manage the host's converted images",
		Long: `Images are pulled from a registry, an OCI layout (oci:DIR[:TAG]) or a
docker save tarball (docker-archive:FILE[:TAG]), flattened, and kept as one
read-only erofs filesystem per manifest digest, shared by every VM that runs it.`,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "pull IMAGE",
		Short: "Pull and convert an image (always contacts the source)",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			img, err := g.store(terminalOr(c.ErrOrStderr())).Get(c.Context(), args[0], image.PullAlways)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "%s %s\n", img.Ref, img.Digest)
			return nil
		},
	}, &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List converted images",
		Args:    cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			entries, err := g.store(nil).List()
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REFERENCE\tDIGEST\tSIZE")
			for _, e := range entries {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Ref, e.Digest[:min(len(e.Digest), 19)], humanBytes(e.Size))
			}
			return tw.Flush()
		},
	}, &cobra.Command{
		Use:     "rm IMAGE...",
		Aliases: []string{"remove"},
		Short:   "Remove images by reference or digest",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			s := g.store(nil)
			for _, a := range args {
				if err := s.Remove(a); err != nil {
					return err
				}
				fmt.Fprintf(c.OutOrStdout(), "removed %s\n", a)
			}
			return nil
		},
	}, &cobra.Command{
		Use:   "prune",
		Short: "Remove converted images no reference names, and leftovers of interrupted pulls",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			removed, err := g.store(nil).Prune()
			for _, d := range removed {
				fmt.Fprintf(c.OutOrStdout(), "removed %s\n", d)
			}
			return err
		},
	})
	return cmd
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
