// Package vmm defines what hearth needs from a virtual machine monitor, so
// that QEMU (vmm/qemu) and Firecracker drive the same sandboxes. A driver
// boots a kernel and initramfs with a set of drives and a host channel to the
// guest agent; everything a VM owns on the host lives under its RunDir.
//
// How Firecracker's REST API maps onto this interface, for its driver:
// Kernel, Initrd and Cmdline are PUT /boot-source; VCPUs and MemoryMiB are
// PUT /machine-config; each Drive is PUT /drives/{ID} (is_read_only from
// ReadOnly; Firecracker has no drive serials, so its guests find disks by
// order, vda first); Channel is PUT /vsock with a uds_path under RunDir,
// dialled with "CONNECT <port>\n" (hybrid vsock); the Start action is
// PUT /actions InstanceStart; Kill ends the process; Logs reads its log
// FIFO and the serial console; Pause and Resume are PATCH /vm {"state":
// "Paused"|"Resumed"}, Snapshot is PUT /snapshot/create (mem_file_path,
// snapshot_path) and Restore PUT /snapshot/load with a MAP_PRIVATE memory
// backend (backend_type File). Net is PUT /network-interfaces/eth0
// (host_dev_name, guest_mac GuestMAC).
package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// Accel is how guest code executes.
type Accel string

const (
	// KVM runs the guest on hardware virtualization: the isolation boundary.
	KVM Accel = "kvm"
	// TCG is QEMU's software emulation. It is not a security boundary.
	TCG Accel = "tcg"
)

// ParseAccel parses "kvm", "tcg" or "" / "auto" (detect).
func ParseAccel(s string) (Accel, error) {
	switch s {
	case "", "auto":
		return DetectAccel(), nil
	case "kvm":
		if !KVMUsable() {
			return "", fmt.Errorf("--accel kvm: this host has no usable KVM (%s)", KVMReason())
		}
		return KVM, nil
	case "tcg":
		return TCG, nil
	}
	return "", fmt.Errorf("--accel %q: want kvm, tcg or auto", s)
}

// DetectAccel picks KVM where it is usable, TCG otherwise.
func DetectAccel() Accel {
	if KVMUsable() {
		return KVM
	}
	return TCG
}

// Drive is a block device given to the guest.
type Drive struct {
	ID       string // unique within the VM
	Path     string // a raw image file
	ReadOnly bool
	Serial   string // how the guest agent finds it (/sys/block/vdX/serial)
}

// Config is one VM.
type Config struct {
	ID        string
	RunDir    string // owned by the caller; the driver puts its sockets and logs here
	Kernel    string // uncompressed vmlinux with a PVH entry
	Initrd    string
	Cmdline   string // appended to the driver's own kernel arguments
	VCPUs     int
	MemoryMiB int
	// Channel names the guest agent's virtio-serial port, its one
	// channel to the host (protocol.ChannelName).
	Channel string
	Drives  []Drive
	Accel   Accel
	// MemoryFile, if set, backs guest RAM with this file (shared with the
	// VMM's mapping), so that a snapshot of the VM is a copy of the file
	// plus the device state. Snapshot needs it.
	MemoryFile string
	// Net is the VM's network interface's host side. Every VM has one
	// interface (so that any VM's snapshot can be restored onto a tap);
	// without a tap it is connected to nothing.
	Net Net
}

// Net is the host side of a VM's network interface.
type Net struct {
	Tap string `json:"tap,omitempty"` // a tap device the caller made
}

// GuestMAC is every guest's MAC address. Each guest is alone on its tap
// (the host routes, it does not bridge), so one address serves them all,
// and it survives a snapshot's restore onto another tap.
const GuestMAC = "02:68:65:61:72:74"

// Driver starts VMs.
type Driver interface {
	Name() string
	Start(ctx context.Context, cfg Config) (VM, error)
	// Restore starts a VM from a snapshot directory that Snapshot wrote,
	// paused: the caller connects to its channel, so that the guest
	// finds its host there, then calls Resume. cfg must describe the same machine (memory size,
	// VCPUs, drives in the same order; the drives' files may be other
	// copies) and MemoryFile is ignored: the snapshot's memory file is
	// mapped copy-on-write, so that clones of one snapshot share its pages
	// and never change it.
	Restore(ctx context.Context, cfg Config, dir string) (VM, error)
	// Snapshot pauses the VM whose run directory is runDir, from any
	// process, and writes its memory and device state to dir (which must
	// exist and be empty); the VM stays paused. It returns the Config the
	// VM was started with. The caller quiesces the guest first and copies
	// the writable drives. The VM needs a MemoryFile.
	Snapshot(ctx context.Context, runDir, dir string) (Config, error)
	// Pause stops the vCPUs of the VM in runDir; Resume runs them again.
	Pause(ctx context.Context, runDir string) error
	Resume(ctx context.Context, runDir string) error
}

// VM is a running VM.
type VM interface {
	// Channel returns the host end of the guest agent's byte stream.
	Channel(ctx context.Context) (net.Conn, error)
	// Wait returns when the VMM process has exited; nil if it exited
	// because the guest reset or powered off.
	Wait(ctx context.Context) error
	// Kill stops the VMM at once; it is safe to call more than once and
	// after the VM has exited. It returns after the process is gone.
	Kill() error
	// Pid is the VMM process.
	Pid() int
	// Logs returns the last n bytes of the VMM's and the guest console's
	// output, for error messages.
	Logs(n int) string
}

// Files of a snapshot directory.
const (
	SnapshotMemory = "memory" // guest RAM, as the VM's MemoryFile was
	SnapshotState  = "state"  // the VMM's device state
	SnapshotInfo   = "snapshot.json"
)

// ErrBadSnapshot means a snapshot directory is incomplete, corrupt or was
// made for another machine or VMM.
var ErrBadSnapshot = errors.New("bad snapshot")

// ErrExited means the VMM process ended before the operation finished.
var ErrExited = errors.New("VMM exited")

// Migrator is a Driver that moves a running VM to another VMM process,
// on this host or another, over a byte stream (a socket): pre-copy of
// guest RAM while the guest runs, then a short pause for the last dirty
// pages and the device state, with the writable drives' blocks in the
// same stream.
type Migrator interface {
	// Incoming starts a VM for cfg that loads the stream read from conn
	// (the receiving end of a socket; the VMM takes its own copy) instead
	// of booting. cfg must describe the sending VM's machine (memory,
	// vCPUs, drives in the same order, with files of the same sizes).
	// The VM stays paused until Accept returns.
	//
	// Under TCG (development), live pre-copy wants guest RAM anonymous
	// on both sides (no MemoryFile), or else StopAndCopy: QEMU 7.2's live
	// pre-copy between VMs whose RAM is a shared file mapping (on ext4 or
	// tmpfs, on either side) lost pages in 2 to 3 migrations in 10 on the
	// development host — the guest oopsed at once through a stale
	// scheduler pointer — and never with anonymous RAM (36 in 36) or with
	// the source paused first (12 in 12). KVM tracks dirty pages itself;
	// see docs/migration.md.
	Incoming(ctx context.Context, cfg Config, conn *os.File) (Incoming, error)
	// MigrateOut sends the running VM in runDir over conn (the sending
	// end). On success the VM is paused for good and its owner ends it;
	// on failure, or when ctx ends, the migration is cancelled and the VM
	// runs on as before.
	MigrateOut(ctx context.Context, runDir string, conn *os.File, opts MigrateOptions) (MigrateStats, error)
}

// Incoming is a VM receiving a migration.
type Incoming interface {
	VM
	// Accept waits until the whole stream has loaded. The caller
	// connects to the VM's Channel before (virtio-serial tells the guest
	// its host hung up where the port's host side was connected on the
	// source and is not on the target), and calls Resume after.
	Accept(ctx context.Context) error
	// Resume runs the guest.
	Resume(ctx context.Context) error
}

// MigrateOptions tune a migration.
type MigrateOptions struct {
	// DowntimeLimit is the longest pause QEMU aims for when it decides to
	// stop the guest and send the rest (default 50 ms).
	DowntimeLimit time.Duration
	// Timeout bounds the whole transfer (default 5 minutes): a guest that
	// dirties memory faster than the stream carries it, even throttled,
	// is left running where it is.
	Timeout time.Duration
	// Bandwidth caps the stream in bytes a second (0: no cap).
	Bandwidth int64
	// StopAndCopy pauses the guest before the copy instead of copying
	// while it runs: the pause is the whole copy, but no page depends on
	// dirty tracking. The sandbox layer asks for it under TCG, whose
	// dirty tracking loses pages (see Migrator.Incoming).
	StopAndCopy bool
	// BeforeSwitch, if set, runs once the source is paused and everything
	// but the last pages is sent; an error cancels the migration and the
	// source resumes. (The network's switch is prepared here.)
	BeforeSwitch func(ctx context.Context) error
}

// MigrateStats is what a migration took.
type MigrateStats struct {
	Total    time.Duration // from start to the switch
	Downtime time.Duration // the guest's pause, as the source measured it (StopAndCopy: from the stop)
	Bytes    int64         // sent over the stream
	Rounds   int           // dirty-memory passes
	// Throttled is the largest share of vCPU time the source took away
	// from the guest for it to converge (auto-converge), in percent.
	Throttled int
}

// ErrNoConvergence means the guest dirtied memory faster than the
// migration could carry it, within its Timeout.
var ErrNoConvergence = errors.New("migration did not converge")
