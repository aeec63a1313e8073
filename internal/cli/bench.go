package cli

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"hearth.dev/hearth/internal/bench"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/vmm"
)

func benchCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure hearth against a bare VMM on this host",
	}
	var n, memory int
	var accelFlag string
	boot := &cobra.Command{
		Use:   "boot",
		Short: "Time `hearth run IMAGE true` against a bare QEMU boot of the same kernel",
		Long: `Boots N sandboxes one after another from a busybox image built locally and
times each "hearth run IMAGE true", interleaved with bare qemu-system-x86_64
boots of the same kernel, the same machine and devices, and an initramfs that
powers off at once: hearth's own (the agent, told to power off) and a busybox
one. Prints p50 and p90, the ratios, the VMM's memory beyond guest RAM, and
whether a second run of a converted image converts again. The last line is
one JSON object.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			accel, err := vmm.ParseAccel(accelFlag)
			if err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			work, err := os.MkdirTemp("", "hearth-bench-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			agent, err := config.Agent()
			if err != nil {
				return err
			}
			initrd, err := initramfs.Ensure(filepath.Join(config.CacheDir(), "initramfs"), agent)
			if err != nil {
				return err
			}
			env := append(os.Environ(), "HEARTH_RUN_DIR="+filepath.Join(work, "run"), "HEARTH_AGENT="+agent)
			res, err := bench.Boot(c.Context(), bench.BootOptions{
				N: n, Hearth: self, Env: env, Kernel: config.Kernel(), Initrd: initrd, Accel: accel,
				MemoryMiB: memory, WorkDir: work, Images: g.store(nil), Out: c.OutOrStdout(),
			})
			if err != nil {
				return err
			}
			fmt.Fprintln(c.OutOrStdout(), res.JSON())
			return nil
		},
	}
	boot.Flags().IntVarP(&n, "n", "n", 10, "boots of each kind")
	boot.Flags().IntVar(&memory, "memory", 256, "guest memory in MiB")
	boot.Flags().StringVar(&accelFlag, "accel", "auto", "kvm, tcg or auto")
	cmd.AddCommand(boot)
	return cmd
}
