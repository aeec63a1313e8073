package sandbox

import (
	"log/slog"
	"os"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// NewRuntime is the runtime of this host: QEMU ($HEARTH_QEMU), jailed
// when hearth runs as root (internal/jail), the guest
// kernel given or the cache's, hearth-agent found by config.Agent, and the
// cache and run directories of config.
func NewRuntime(images *image.Store, accel vmm.Accel, pull image.PullPolicy, kernel string, log *slog.Logger) (*Runtime, error) {
	agent, err := config.Agent()
	if err != nil {
		return nil, err
	}
	if kernel == "" {
		kernel = config.Kernel()
	}
	driver := &qemu.Driver{Binary: os.Getenv("HEARTH_QEMU")}
	if os.Geteuid() == 0 {
		if driver.Jail, err = jail.HostOptions(); err != nil {
			return nil, err
		}
	}
	return &Runtime{
		Images:     images,
		Driver:     driver,
		Accel:      accel,
		Kernel:     kernel,
		KernelArgs: os.Getenv("HEARTH_KERNEL_ARGS"),
		Agent:      agent,
		CacheDir:   config.CacheDir(),
		RunRoot:    config.RunRoot(),
		Pull:       pull,
		Log:        log,
	}, nil
}
