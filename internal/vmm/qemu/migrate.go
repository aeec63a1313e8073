package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"hearth.dev/hearth/internal/vmm"
)

var _ vmm.Migrator = (*Driver)(nil)

// Incoming starts QEMU with -incoming on conn: it reads the stream from
// the moment it starts, so that a caller that dies before the stream
// began leaves no QEMU waiting for ever (an unjailed QEMU that changed
// its uid has lost its parent-death signal): conn's other end closes,
// the load fails and QEMU ends. -S keeps the loaded guest paused until
// Resume, after its owner has connected to the agent's channel.
//
// The destination needs no migration capabilities of its own for
// hearth's streams: x-ignore-shared is off (every page comes in the
// stream, into a fresh memory file), and block migration and
// auto-converge are the sender's.
func (d *Driver) Incoming(ctx context.Context, cfg vmm.Config, conn *os.File) (vmm.Incoming, error) {
	vm, err := d.launchWith(ctx, cfg, cfg.MemoryFile, true, conn, "-S", "-incoming", fmt.Sprintf("fd:%d", streamFD(cfg)))
	if err != nil {
		return nil, err
	}
	return &incoming{VM: vm}, nil
}

// streamFD is the migration stream's descriptor in QEMU: after the
// drives' and the tap's (vmFiles).
func streamFD(cfg vmm.Config) int {
	fd := tapFD(cfg)
	if cfg.Net.Tap != "" {
		fd++
	}
	return fd
}

type incoming struct{ *VM }

// Accept waits for the incoming stream to load. QEMU ends itself if it
// does not (a broken or hostile sender, a stream of another machine).
func (v *incoming) Accept(ctx context.Context) error {
	if exited, err := v.awaitIncoming(ctx); err != nil {
		if exited {
			err = fmt.Errorf("%w: the incoming migration did not load: %v", vmm.ErrExited, err)
		}
		return v.fail(err)
	}
	return nil
}

// awaitIncoming waits for an incoming stream (a migration's, a
// snapshot's) to load. QEMU ends itself on one it cannot load: exited
// says whether it did, within a second of the failure.
func (v *VM) awaitIncoming(ctx context.Context) (exited bool, err error) {
	if err = v.mon.waitMigration(ctx, "completed"); err == nil {
		return false, nil
	}
	select {
	case <-v.done:
		return true, err
	case <-time.After(time.Second):
		return false, err
	}
}

func (v *incoming) Resume(context.Context) error {
	return v.mon.qmp("cont", nil, nil)
}

// migrateStatus is the part of query-migrate hearth reads.
type migrateStatus struct {
	Status      string `json:"status"`
	ErrorDesc   string `json:"error-desc"`
	TotalTime   int64  `json:"total-time"` // ms
	Downtime    int64  `json:"downtime"`   // ms
	CPUThrottle int    `json:"cpu-throttle-percentage"`
	RAM         struct {
		Transferred    int64 `json:"transferred"`
		DirtySyncCount int   `json:"dirty-sync-count"`
	} `json:"ram"`
	Disk struct {
		Transferred int64 `json:"transferred"`
	} `json:"disk"`
}

// MigrateOut sends the VM in runDir over conn with QEMU's pre-copy:
// RAM is sent while the guest runs, then the pages it dirtied meanwhile,
// round after round, until what is left fits in the downtime limit at
// the measured bandwidth; then QEMU pauses the guest
// (pause-before-switchover: hearth's BeforeSwitch runs here), sends the
// rest and the device state. A guest that dirties memory faster than the
// stream carries it is slowed down by auto-converge (its vCPUs are
// throttled, 20% more each round that does not converge, up to 99%)
// rather than switched to post-copy: with post-copy a lost connection
// loses the VM, half of its memory on each host, and the threat model
// has the target's host fetching pages on the guest's demand. Writable
// drives travel in the same stream (QEMU's block migration: the target
// has its own copies of the files, of the same sizes).
func (d *Driver) MigrateOut(ctx context.Context, runDir string, conn *os.File, opts vmm.MigrateOptions) (stats vmm.MigrateStats, err error) {
	cfg, err := startedWith(runDir)
	if err != nil {
		return stats, fmt.Errorf("migrate: %w", err)
	}
	if opts.DowntimeLimit <= 0 {
		opts.DowntimeLimit = 50 * time.Millisecond
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Minute
	}
	writable := false
	for _, dr := range cfg.Drives {
		writable = writable || !dr.ReadOnly
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	err = control(runDir, func(m *monitor) error {
		if st, err := m.status(); err != nil {
			return err
		} else if st != "running" {
			return fmt.Errorf("the VM is %s, not running", st)
		}
		if err := m.setCapabilities(map[string]bool{"x-ignore-shared": false, "auto-converge": true,
			"pause-before-switchover": true, "zero-blocks": writable}); err != nil {
			return err
		}
		bw := opts.Bandwidth
		if bw <= 0 {
			bw = 1 << 40 // QEMU's default is 128 MiB/s
		}
		if err := m.qmp("migrate-set-parameters", map[string]any{
			"downtime-limit": opts.DowntimeLimit.Milliseconds(), "max-bandwidth": bw,
			"cpu-throttle-initial": 20, "cpu-throttle-increment": 20, "max-cpu-throttle": 99,
		}, nil); err != nil {
			return err
		}
		if err := m.qmpFile("getfd", map[string]string{"fdname": "migrate"}, nil, conn); err != nil {
			return err
		}
		stopped := time.Now()
		if opts.StopAndCopy {
			if err := m.qmp("stop", nil, nil); err != nil {
				return err
			}
		}
		if err := m.qmp("migrate", map[string]any{"uri": "fd:migrate", "blk": writable}, nil); err != nil {
			// QEMU keeps the descriptor it was given until it is used:
			// the target would never see the stream end.
			return errors.Join(err, m.qmp("closefd", map[string]string{"fdname": "migrate"}, nil), m.abandon())
		}
		st, err := m.followMigration(ctx, opts.BeforeSwitch)
		stats = vmm.MigrateStats{Total: time.Duration(st.TotalTime) * time.Millisecond,
			Downtime: time.Duration(st.Downtime) * time.Millisecond, Bytes: st.RAM.Transferred + st.Disk.Transferred,
			Rounds: st.RAM.DirtySyncCount, Throttled: st.CPUThrottle}
		if opts.StopAndCopy {
			stats.Downtime = time.Since(stopped)
		}
		if err != nil {
			return errors.Join(err, m.abandon())
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil && parent.Err() == nil {
			err = fmt.Errorf("%w in %s (%d rounds, %d MiB sent, vCPUs throttled %d%%): %w",
				vmm.ErrNoConvergence, opts.Timeout, stats.Rounds, stats.Bytes>>20, stats.Throttled, err)
		}
		return stats, fmt.Errorf("migrate: %w", err)
	}
	return stats, nil
}

// followMigration polls an outgoing migration to its end, running
// beforeSwitch at the pre-switchover pause; it returns the last status.
func (m *monitor) followMigration(ctx context.Context, beforeSwitch func(context.Context) error) (migrateStatus, error) {
	var st migrateStatus
	continued := false
	for {
		st = migrateStatus{}
		if err := m.qmp("query-migrate", nil, &st); err != nil {
			return st, err
		}
		switch st.Status {
		case "completed":
			return st, nil
		case "failed", "cancelled":
			return st, fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		case "pre-switchover":
			if continued { // QEMU has not moved on yet
				break
			}
			continued = true
			if beforeSwitch != nil {
				if err := beforeSwitch(ctx); err != nil {
					return st, fmt.Errorf("before the switch: %w", err)
				}
			}
			if err := m.qmp("migrate-continue", map[string]string{"state": "pre-switchover"}, nil); err != nil {
				return st, err
			}
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// abandon cancels an outgoing migration and makes sure the guest runs
// again: QEMU resumes it itself on a failure during the copy, but not
// once it is paused at pre-switchover or past it.
func (m *monitor) abandon() error {
	_ = m.qmp("migrate_cancel", nil, nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st migrateStatus
		if err := m.qmp("query-migrate", nil, &st); err != nil {
			return err
		}
		if st.Status != "cancelling" && st.Status != "active" && st.Status != "pre-switchover" && st.Status != "device" {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the migration did not end after migrate_cancel (%s)", st.Status)
		}
		time.Sleep(5 * time.Millisecond)
	}
	run, err := m.status()
	if err != nil {
		return err
	}
	if run != "running" {
		return m.qmp("cont", nil, nil)
	}
	return nil
}
