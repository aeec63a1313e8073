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

// Host is where a runtime finds its VMM and the guest's files. The node
// agent finds them once (HostFromEnv) and writes them into each shim's
// spec, so that a shim depends on no environment it inherited.
type Host struct {
	QEMU string `json:"qemu,omitempty"` // the binary; "" is qemu-system-x86_64 on PATH
	// Jail, if set, jails each VMM (internal/jail): hearth runs as root.
	Jail       *jail.Options `json:"jail,omitempty"`
	Kernel     string        `json:"kernel"` // guest vmlinux
	KernelArgs string        `json:"kernelArgs,omitempty"`
	Agent      string        `json:"agent"` // hearth-agent
	CacheDir   string        `json:"cacheDir"`
	RunRoot    string        `json:"runRoot"`
}

// HostFromEnv is this host as config finds it: QEMU ($HEARTH_QEMU),
// jailed when hearth runs as root, the guest kernel given or the
// cache's, hearth-agent found by config.Agent, and the cache and run
// directories of config.
func HostFromEnv(kernel string) (Host, error) {
	agent, err := config.Agent()
	if err != nil {
		return Host{}, err
	}
	if kernel == "" {
		kernel = config.Kernel()
	}
	h := Host{QEMU: os.Getenv("HEARTH_QEMU"), Kernel: kernel, KernelArgs: os.Getenv("HEARTH_KERNEL_ARGS"),
		Agent: agent, CacheDir: config.CacheDir(), RunRoot: config.RunRoot()}
	if os.Geteuid() == 0 {
		if h.Jail, err = jail.HostOptions(); err != nil {
			return Host{}, err
		}
	}
	return h, nil
}

// NewRuntime is the runtime of host h.
func NewRuntime(h Host, images *image.Store, accel vmm.Accel, pull image.PullPolicy, log *slog.Logger) *Runtime {
	return &Runtime{
		Images:     images,
		Driver:     &qemu.Driver{Binary: h.QEMU, Jail: h.Jail},
		Accel:      accel,
		Kernel:     h.Kernel,
		KernelArgs: h.KernelArgs,
		Agent:      h.Agent,
		CacheDir:   h.CacheDir,
		RunRoot:    h.RunRoot,
		Pull:       pull,
		Log:        log,
	}
}
