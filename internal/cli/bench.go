package cli

import "github.com/spf13/cobra"

func benchCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure hearth against a bare VMM on this host",
	}
	return cmd
}
