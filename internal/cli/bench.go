package cli

import (
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/config"
)

// benchCmd runs hearth-bench: the benchmarks and the test helpers they
// need (network namespaces, simulated hosts) are a binary of their own,
// not linked into hearth.
func benchCmd(*globals) *cobra.Command {
	return &cobra.Command{
		Use:   "bench BENCHMARK [FLAGS]",
		Short: "Measure hearth against a bare VMM, etcd, kube-apiserver and nginx on this host (runs hearth-bench)",
		Long: `Runs hearth-bench (found beside hearth, on PATH or in $HEARTH_BENCH) with the
same arguments: boot, api, scheduler, warm, ingress, policy, all, compare.
'hearth bench --help' is hearth-bench's help.`,
		DisableFlagParsing: true,
		RunE: func(c *cobra.Command, args []string) error {
			bin, err := config.Bench()
			if err != nil {
				return err
			}
			cmd := exec.Command(bin, args...)
			cmd.Stdin, cmd.Stdout, cmd.Stderr = c.InOrStdin(), c.OutOrStdout(), c.ErrOrStderr()
			// Ctrl-C reaches hearth-bench through the terminal's process
			// group; hearth waits for it to clean up rather than dying first.
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sigs)
			if err := cmd.Start(); err != nil {
				return err
			}
			go func() {
				for s := range sigs {
					if s == syscall.SIGTERM {
						_ = cmd.Process.Signal(s)
					}
				}
			}()
			err = cmd.Wait()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return &ExitError{Code: 128 + int(ws.Signal())} // as a shell reports it
				}
				return &ExitError{Code: ee.ExitCode()}
			}
			return err
		},
	}
}
