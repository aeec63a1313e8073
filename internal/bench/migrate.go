package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// MigrateOptions configures the migration benchmark.
type MigrateOptions struct {
	N         int // migrations of each kind
	Kernel    string
	Initrd    string // hearth's initramfs: the guest agent waits for its host
	Accel     vmm.Accel
	MemoryMiB int
	WorkDir   string
	Out       io.Writer
	Jail      *jail.Options // where hearth jails its VMMs
}

// MigrateResult is the migration benchmark's summary. "qemu_defaults" is
// the same VM moved by the same driver with QEMU's own migration
// parameters (max-bandwidth 128 MiB/s, downtime-limit 300 ms) instead of
// hearth's (no bandwidth cap on a host-to-host stream, 50 ms).
type MigrateResult struct {
	N                   int     `json:"n"`
	Accel               string  `json:"accel"`
	MemoryMiB           int     `json:"memory_mib"`
	TotalP50ms          float64 `json:"total_p50_ms"`
	DowntimeP50ms       float64 `json:"downtime_p50_ms"`
	DowntimeMaxms       float64 `json:"downtime_max_ms"`
	SentMiB             float64 `json:"sent_mib"`
	Rounds              int     `json:"rounds"`
	DefaultsTotalP50ms  float64 `json:"qemu_defaults_total_p50_ms"`
	DefaultsDowntimeP50 float64 `json:"qemu_defaults_downtime_p50_ms"`
}

// QEMU's own migration parameters, the baseline.
var qemuDefaults = vmm.MigrateOptions{Bandwidth: 128 << 20, DowntimeLimit: 300 * time.Millisecond}

// Migrate boots one guest and moves it from VMM to VMM 2N times on this
// host, over a socket pair, alternating hearth's parameters with QEMU's
// defaults, and checks each time that the guest runs on (its agent
// answers on the new VMM's channel).
func Migrate(ctx context.Context, o MigrateOptions) (*MigrateResult, error) {
	d := &qemu.Driver{Binary: os.Getenv("HEARTH_QEMU"), Jail: o.Jail}
	cfg := func() (vmm.Config, error) {
		run, err := os.MkdirTemp(o.WorkDir, "migrate-")
		return vmm.Config{ID: "migrate", RunDir: run, Kernel: o.Kernel, Initrd: o.Initrd, VCPUs: 1,
			MemoryMiB: o.MemoryMiB, Accel: o.Accel, Channel: protocol.ChannelName}, err
	}
	c, err := cfg()
	if err != nil {
		return nil, err
	}
	vm, err := d.Start(ctx, c)
	if err != nil {
		return nil, err
	}
	defer func() { vm.Kill() }()
	time.Sleep(time.Second) // the guest's agent is up and waits for its host
	res := &MigrateResult{N: o.N, Accel: string(o.Accel), MemoryMiB: o.MemoryMiB}
	var total, down, dTotal, dDown []time.Duration
	for i := 0; i < 2*o.N; i++ {
		opts, kind := vmm.MigrateOptions{}, "hearth"
		if i%2 == 1 {
			opts, kind = qemuDefaults, "qemu defaults"
		}
		next, err := cfg()
		if err != nil {
			return nil, err
		}
		in, stats, err := migrateOnce(ctx, d, c.RunDir, next, opts)
		if err != nil {
			return nil, fmt.Errorf("migration %d (%s): %w", i+1, kind, err)
		}
		vm.Kill()
		os.RemoveAll(c.RunDir)
		vm, c = in, next
		fmt.Fprintf(o.Out, "  %2d %-13s total %6.1f ms, downtime %5.1f ms, %4d MiB, %d rounds\n",
			i+1, kind, ms(stats.Total), ms(stats.Downtime), stats.Bytes>>20, stats.Rounds)
		if i%2 == 0 {
			total, down = append(total, stats.Total), append(down, stats.Downtime)
			res.SentMiB, res.Rounds = round(float64(stats.Bytes)/(1<<20), 1), stats.Rounds
			res.DowntimeMaxms = max(res.DowntimeMaxms, ms(stats.Downtime))
		} else {
			dTotal, dDown = append(dTotal, stats.Total), append(dDown, stats.Downtime)
		}
	}
	// The guest came through every move: its agent answers.
	if err := agentAnswers(ctx, vm); err != nil {
		return nil, fmt.Errorf("after %d migrations: %w", 2*o.N, err)
	}
	res.TotalP50ms, res.DowntimeP50ms = pct(total, 50), pct(down, 50)
	res.DefaultsTotalP50ms, res.DefaultsDowntimeP50 = pct(dTotal, 50), pct(dDown, 50)
	os.RemoveAll(c.RunDir)
	return res, nil
}

// migrateOnce moves the VM in runDir into a new VMM for next and
// resumes it there.
func migrateOnce(ctx context.Context, d *qemu.Driver, runDir string, next vmm.Config, opts vmm.MigrateOptions) (vmm.VM, vmm.MigrateStats, error) {
	send, recv, err := vmm.StreamPair()
	if err != nil {
		return nil, vmm.MigrateStats{}, err
	}
	defer send.Close()
	in, err := d.Incoming(ctx, next, recv)
	recv.Close()
	if err != nil {
		return nil, vmm.MigrateStats{}, err
	}
	stats, err := d.MigrateOut(ctx, runDir, send, opts)
	if err == nil {
		err = in.Accept(ctx)
	}
	if err == nil {
		err = in.Resume(ctx)
	}
	if err != nil {
		return nil, stats, fmt.Errorf("%w\n%s", err, in.Logs(2048))
	}
	return in, stats, nil
}

// agentAnswers says hello with a protocol version the agent does not
// speak: it answers with its own and powers off.
func agentAnswers(ctx context.Context, vm vmm.VM) error {
	conn, err := vm.Channel(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	if err := protocol.NewWriter(conn).WriteJSON(protocol.THello, 0, protocol.Hello{Version: protocol.Version + 100}); err != nil {
		return err
	}
	f, err := protocol.NewReader(conn).Read()
	if err != nil || f.Type != protocol.THello {
		return fmt.Errorf("the guest's agent did not answer (%v)\n%s", err, vm.Logs(2048))
	}
	return nil
}

// Summary is the result in the benchmarks' common shape.
func (r *MigrateResult) Summary() *Result {
	return &Result{Bench: "migrate", N: r.N,
		Figure:  NewFigure("downtime_p50_ms", r.DowntimeP50ms, "qemu_defaults_downtime_p50_ms", r.DefaultsDowntimeP50, Lower, 0),
		More:    []Figure{NewFigure("total_p50_ms", r.TotalP50ms, "qemu_defaults_total_p50_ms", r.DefaultsTotalP50ms, Lower, 0)},
		Details: r}
}
