package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/vmm"
)

// ErrMigrated ends the sandbox here: its VM moved to another VMM, where
// its workload runs on.
var ErrMigrated = errors.New("the sandbox moved to another host")

// ErrMigrating refuses a new exec or control while the sandbox moves.
var ErrMigrating = errors.New("the sandbox is moving to another host")

// ErrCannotMigrate means this sandbox cannot be moved (its reason
// follows).
var ErrCannotMigrate = errors.New("the sandbox cannot migrate")

// migration is what the source's host sends ahead of the VMM's stream:
// what the target's host needs to serve the moved sandbox (the channel's
// next session), and the machine and image, to be checked against the
// sandbox's own spec and the image there.
type migration struct {
	Protocol    int    `json:"protocol"`
	Digest      string `json:"digest"`
	NextSession uint32 `json:"nextSession"`
	VCPUs       int    `json:"vcpus"`
	MemoryMiB   int    `json:"memoryMiB"`
	DiskBytes   int64  `json:"diskBytes"`
	// MemoryFile: the source's RAM is a memory file (a snapshottable
	// sandbox), and the target's must be one too.
	MemoryFile bool `json:"memoryFile,omitempty"`
	// Nonce is echoed in the handover's two words: the VMMs, which
	// never see the header (the source's gets the socket after it, the
	// target's starts after it is read), cannot forge them.
	Nonce []byte `json:"nonce"`
}

// The handover's two words, after the VMM's stream, each a byte and the
// header's nonce: the target's "loaded" and the source's "handed over"
// (MigrateOut).
const (
	migrationLoaded   = 'L'
	migrationHandover = 'H'
	nonceSize         = 16
)

// handoverLimit bounds each exchange with the peer outside the VMM's
// stream: the header, each word of the handover (a variable for tests).
var handoverLimit = 30 * time.Second

// incomingLimit bounds a target's wait for the whole stream.
const incomingLimit = 10 * time.Minute

// withLimit runs f, which reads or writes conn, within limit: past it,
// the socket is shut down, which ends f's call (conn may be a blocking
// file, which Close would not interrupt). The socket is put in blocking
// mode first: the VMM shares its open file, and QEMU made it
// non-blocking, which os.File, not polling it, would see as EAGAIN.
func withLimit(conn *os.File, limit time.Duration, f func() error) error {
	fd := int(conn.Fd())
	if err := syscall.SetNonblock(fd, false); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(limit):
		if err := syscall.Shutdown(fd, syscall.SHUT_RDWR); err != nil {
			return fmt.Errorf("no word within %s, and the connection would not shut down: %w", limit, err)
		}
		<-done
		return fmt.Errorf("no word within %s", limit)
	}
}

// say writes the word tag with nonce.
func say(conn *os.File, tag byte, nonce []byte) error {
	return withLimit(conn, handoverLimit, func() error {
		_, err := conn.Write(append([]byte{tag}, nonce...))
		return err
	})
}

// expect reads the word tag with nonce.
func expect(conn *os.File, tag byte, nonce []byte) error {
	return withLimit(conn, handoverLimit, func() error {
		buf := make([]byte, 1+len(nonce))
		if _, err := io.ReadFull(conn, buf); err != nil {
			return err
		}
		if buf[0] != tag || subtle.ConstantTimeCompare(buf[1:], nonce) != 1 {
			return fmt.Errorf("got %q and another nonce, want %q and the header's", buf[0], tag)
		}
		return nil
	})
}

// maxMigrationHeader bounds the header a target reads from its source.
const maxMigrationHeader = 1 << 20

// writeHeader writes m, length first, straight to conn: the VMM reads
// the rest of the same socket.
func writeHeader(conn *os.File, m migration) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	buf := binary.BigEndian.AppendUint32(nil, uint32(len(b)))
	_, err = conn.Write(append(buf, b...))
	return err
}

// readHeader reads the header, within handoverLimit, and not a byte
// more: the VMM reads on from there.
func readHeader(conn *os.File) (migration, error) {
	var m migration
	err := withLimit(conn, handoverLimit, func() (err error) {
		m, err = readHeaderBytes(conn)
		return err
	})
	return m, err
}

func readHeaderBytes(conn *os.File) (migration, error) {
	var m migration
	var n [4]byte
	if _, err := io.ReadFull(conn, n[:]); err != nil {
		return m, fmt.Errorf("the migration's header: %w", err)
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > maxMigrationHeader {
		return m, fmt.Errorf("the migration's header is %d bytes, more than %d", size, maxMigrationHeader)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(conn, b); err != nil {
		return m, fmt.Errorf("the migration's header: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("the migration's header: %w", err)
	}
	return m, nil
}

// MigrateOut moves the sandbox over conn, a socket whose other end is a
// RunIncoming (on another host: its node agents relay the socket): the
// header, then the VMM's live migration, then the handover. No exec or
// control starts meanwhile (ErrMigrating), and no snapshot. On success
// the workload runs on there, this VM has ended after what it had passed
// on was read, and the workload's session here ends with ErrMigrated
// (Run returns it); execs in flight here end with it too. On failure the
// sandbox runs on here as before — or, if its VM cannot be resumed, it
// is ended, so that Run returns rather than hold a paused VM.
//
// The handover: after the stream the target says it loaded the VM, and
// only then is this VM paused for good and the target told to resume
// it. Without the target's word within handoverLimit this VM runs on
// (cont from postmigrate takes its drives back) and the target, which
// never hears the handover, ends itself. Once the handover is sent this
// VM never runs again, so that the sandbox never runs twice; should the
// word be lost on its way, the sandbox runs nowhere (its owner restarts
// it).
func (r *Running) MigrateOut(ctx context.Context, conn *os.File, opts vmm.MigrateOptions) (stats vmm.MigrateStats, err error) {
	m, ok := r.driver.(vmm.Migrator)
	switch {
	case !ok:
		return stats, fmt.Errorf("%w: the %s driver cannot migrate", ErrCannotMigrate, r.driver.Name())
	case r.vm == nil:
		return stats, fmt.Errorf("%w: it was started from a snapshot", ErrCannotMigrate)
	}
	var disk int64
	for _, d := range r.cfg.Drives {
		if d.ID == rwDrive {
			fi, err := os.Stat(d.Path)
			if err != nil {
				return stats, err
			}
			disk = fi.Size()
		}
	}
	nonce := make([]byte, nonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return stats, err
	}
	r.snap.Lock() // no snapshot meanwhile
	defer r.snap.Unlock()
	next, err := r.ch.setMoving(true)
	if err != nil {
		return stats, err
	}
	defer func() {
		if err != nil {
			_, _ = r.ch.setMoving(false)
			// QEMU resumes the guest itself after most failures, not
			// from postmigrate; cont on a running VM does nothing.
			if rerr := r.driver.Resume(ctx, r.runDir); rerr != nil {
				err = errors.Join(err, fmt.Errorf("the VM could not be resumed, and is ended: %w", rerr), r.vm.Kill())
			}
		}
	}()
	h := migration{Protocol: protocol.Version, Digest: r.digest, NextSession: next, VCPUs: max(r.cfg.VCPUs, 1),
		MemoryMiB: r.cfg.MemoryMiB, DiskBytes: disk, MemoryFile: r.cfg.MemoryFile != "", Nonce: nonce}
	if err := withLimit(conn, handoverLimit, func() error { return writeHeader(conn, h) }); err != nil {
		return stats, fmt.Errorf("migrate: send the header: %w", err)
	}
	// Under TCG, dirty tracking loses pages: the guest is paused for the
	// whole copy (vmm.MigrateOptions.StopAndCopy).
	opts.StopAndCopy = opts.StopAndCopy || r.cfg.Accel == vmm.TCG
	if stats, err = r.sendVM(ctx, m, conn, opts); err != nil {
		return stats, err
	}
	if err := expect(conn, migrationLoaded, nonce); err != nil {
		return stats, fmt.Errorf("migrate: the target did not confirm it loaded the VM: %w", err)
	}
	if !r.ch.handOver() {
		// Its exit came here before the pause: the sandbox has ended
		// here, and the target, without the handover, ends itself.
		return stats, errors.New("migrate: the workload ended during the move")
	}
	if err := say(conn, migrationHandover, nonce); err != nil {
		// The target cannot have heard it: it ends itself, and this VM
		// is the sandbox still.
		r.ch.takeBack()
		return stats, fmt.Errorf("migrate: hand over to the target: %w", err)
	}
	// The guest runs on the target. What this VMM passed to the channel
	// before the switch is read to its end (the VMM's exit closes its
	// side), then the channel ends with ErrMigrated.
	err = r.vm.Kill()
	select {
	case <-r.ch.done:
	case <-time.After(5 * time.Second):
		r.ch.close()
	}
	return stats, err
}

// sendVM has the VMM send the VM over conn through a socket of the VMM's
// own, whose other end this copies to conn: a VMM the guest took over can
// send the stream, but never read the target's "loaded" word (its nonce
// would let it forge the handover) nor write after the stream ends.
func (r *Running) sendVM(ctx context.Context, m vmm.Migrator, conn *os.File, opts vmm.MigrateOptions) (vmm.MigrateStats, error) {
	theirs, ours, err := vmm.StreamFileConn()
	if err != nil {
		return vmm.MigrateStats{}, err
	}
	defer ours.Close()
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, ours)
		if err != nil {
			ours.Close() // the VMM's next write fails: it stops at once
		}
		copied <- err
	}()
	stats, err := m.MigrateOut(ctx, r.runDir, theirs, opts)
	theirs.Close()
	// The VMM lets go of its copy when its migration ends, either way:
	// then the copy has passed on all it sent.
	select {
	case cerr := <-copied:
		if err == nil && cerr != nil {
			err = fmt.Errorf("migrate: relay the stream: %w", cerr)
		}
	case <-time.After(handoverLimit):
		ours.Close()
		_ = syscall.Shutdown(int(conn.Fd()), syscall.SHUT_RDWR) // a write blocked on the target
		<-copied
		if err == nil {
			err = errors.New("migrate: the stream did not reach the target in time")
		}
	}
	return stats, err
}

// setMoving refuses (on) or allows new sessions again, and returns the
// next session id.
func (c *channel) setMoving(on bool) (uint32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if on && c.moving {
		return 0, ErrMigrating
	}
	c.moving = on
	return c.next, nil
}

// handOver marks the channel's VM as moved, unless its workload has
// ended here: from then on the channel ends with ErrMigrated, and a
// workload's exit read here is the target's to report.
func (c *channel) handOver() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, open := c.sessions[workloadSession]; !open {
		return false
	}
	c.moved = true
	return true
}

// takeBack undoes handOver: the target never heard it.
func (c *channel) takeBack() {
	c.mu.Lock()
	c.moved = false
	c.mu.Unlock()
}

// handedOver says whether frames of session id are the target's now.
func (c *channel) handedOver(id uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.moved && id == workloadSession
}

// RunIncoming runs the sandbox that migrates in over conn (the other end
// of a MigrateOut) to its end, as Run does one it booted. spec is the
// sandbox's own (the API's, not the source's word): the machine the
// source announces must be the one spec describes, the image on this
// host the one the source runs, and the workload's process is spec's.
// The source's header and words are bounded and checked and every wait
// on it is; the rest of the stream goes to the VMM, which ends itself on
// a stream it cannot load. On any failure conn is shut down, so that the
// source learns of it at once and runs on.
func (rt *Runtime) RunIncoming(ctx context.Context, conn *os.File, spec Spec, sio IO) (res *Result, err error) {
	loaded := false
	defer func() {
		if err != nil && !loaded {
			_ = syscall.Shutdown(int(conn.Fd()), syscall.SHUT_RDWR)
		}
	}()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	m, ok := rt.Driver.(vmm.Migrator)
	if !ok {
		return nil, fmt.Errorf("%w: the %s driver cannot migrate", ErrCannotMigrate, rt.Driver.Name())
	}
	log := rt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The image first (its pull, before the source is told to send: under
	// stop-and-copy the source's guest is paused from the first byte).
	p, err := rt.prepare(ctx, spec, log)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, p.done()) }()
	img, id, runDir := p.img, p.id, p.runDir
	if sio.Prepared != nil {
		sio.Prepared()
	}
	h, err := readHeader(conn)
	if err != nil {
		return nil, err
	}
	switch {
	case h.Protocol != protocol.Version:
		return nil, fmt.Errorf("%w: its guest agent speaks protocol %d, this host %d", ErrCannotMigrate, h.Protocol, protocol.Version)
	case len(h.Nonce) != nonceSize:
		return nil, fmt.Errorf("%w: the header's nonce has %d bytes, not %d", ErrCannotMigrate, len(h.Nonce), nonceSize)
	case h.NextSession <= workloadSession || h.NextSession > 1<<30:
		return nil, fmt.Errorf("%w: the source's next session id %d is not in %d..%d", ErrCannotMigrate, h.NextSession, workloadSession+1, 1<<30)
	case h.VCPUs != spec.CPUs || h.MemoryMiB != spec.MemoryMiB || h.DiskBytes != int64(spec.DiskMiB)<<20:
		return nil, fmt.Errorf("%w: the source sends %d vCPUs, %d MiB of memory and a %d MiB disk; the sandbox has %d, %d MiB and %d MiB",
			ErrCannotMigrate, h.VCPUs, h.MemoryMiB, h.DiskBytes>>20, spec.CPUs, spec.MemoryMiB, spec.DiskMiB)
	case h.MemoryFile != spec.Snapshottable:
		return nil, fmt.Errorf("%w: the source's VM is snapshottable: %v, the sandbox's spec: %v", ErrCannotMigrate, h.MemoryFile, spec.Snapshottable)
	}
	if img.Digest != h.Digest {
		return nil, fmt.Errorf("%w: the source runs %s as %.80q, this host has %s", ErrCannotMigrate, spec.Image, h.Digest, img.Digest)
	}
	// The writable disk's blocks come in the stream.
	disk := filepath.Join(runDir, snapshotDisk)
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		return nil, err
	}
	if err := os.Truncate(disk, h.DiskBytes); err != nil {
		return nil, err
	}
	cfg, err := rt.vmConfig(spec, p, disk)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	in, err := m.Incoming(ctx, cfg, conn)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, in.Kill()) }()
	// Connected before the stream loads: vmm.Migrator.Incoming says why.
	chConn, err := in.Channel(ctx)
	if err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, incomingLimit)
	err = in.Accept(actx)
	cancel()
	if err == nil {
		// Loaded: the source pauses its VM for good and hands over, or
		// runs on without a word (MigrateOut).
		loaded = true
		if err = say(conn, migrationLoaded, h.Nonce); err == nil {
			err = expect(conn, migrationHandover, h.Nonce)
		}
	}
	if err != nil {
		chConn.Close()
		return nil, fmt.Errorf("migrate in: %w", err)
	}
	if sio.HandedOver != nil {
		sio.HandedOver()
	}
	ch := newChannel(chConn, h.NextSession, log)
	defer ch.close()
	w := ch.adopt(workloadSession, sinks{sio.Stdout, sio.Stderr})
	go ch.loop(protocol.NewReader(chConn))
	boot := bootOf(spec, img, id)
	r := &Running{ch: ch, driver: rt.Driver, vm: in, cfg: cfg, runDir: runDir, boot: boot, image: spec.Image, digest: img.Digest, log: log}
	if err := in.Resume(ctx); err != nil {
		return nil, err
	}
	if err := r.Control(ctx, protocol.Control{Action: protocol.Migrated, Time: time.Now().UnixNano(), Network: spec.Network}); err != nil {
		return nil, err
	}
	log.Debug("migrated in", "id", id, "took", time.Since(start))
	s := &session{st: w, proc: boot.Process, sio: sio, start: start, log: log, vm: in, vmDone: watch(ctx, in, ch)}
	s.proc.Stdin = false // its stdin's window stayed with the source's host
	s.sio.Started = func() {
		if sio.Running != nil {
			sio.Running(r)
		}
		if sio.Started != nil {
			sio.Started()
		}
	}
	return s.serve(ctx, time.Minute)
}
