// Package protocol is the framed wire protocol between hearth on the host and
// hearth-agent (PID 1) in the guest. The whole conversation runs over one
// byte stream (a virtio-serial port; virtio-vsock where the VMM has it), so
// it carries its own framing, sessions and flow control.
//
// A frame is a 4-byte big-endian length n, then n bytes: one type byte, a
// 4-byte big-endian session id, and the payload. Control messages carry
// JSON payloads; data frames carry raw bytes.
//
// Session 0 is the channel's own: the Hello each way. Every other session
// is one process or one action in the guest, opened by the host with the
// id it picks (ids only grow): Boot opens the workload's, Exec one more
// process in the running sandbox, Control an action on it (a snapshot's
// quiesce, a readiness probe). The host speaks first, Hello and Boot at
// once, so that nothing the guest writes can be lost before the host is
// listening, and the guest starts its work without a round trip.
//
// Flow control goes both ways, per session, so that one session that is
// not read never stalls the channel: the host has at most StdinWindow
// bytes of stdin in flight (the guest returns credit with StdinAck), and
// the guest at most OutputWindow bytes of output (the host returns it
// with OutputAck once its reader has taken them).
package protocol

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// ChannelName is the name of the virtio-serial port that carries the
// protocol.
const ChannelName = "hearth.0"

// PowerOffEnv set to 1 in the guest kernel's command line (which the kernel
// passes to init as environment) makes the agent power off as soon as it
// runs: a bare boot of hearth's own kernel and initramfs, for benchmarks.
const PowerOffEnv = "HEARTH_POWEROFF"

// Version is bumped on every incompatible change; both sides refuse a peer
// with another version during the handshake, and hearth refuses snapshots
// of a guest that spoke another.
//
// 5: one channel with session ids (4 had one port per session), Start
// split into Boot, Exec and Control, output flow control.
const Version = 5

// MaxPayload bounds one frame, so that a corrupt or hostile length cannot
// make the reader allocate without limit.
const MaxPayload = 1 << 20

// headerLen is a frame's type and session id, which its length counts.
const headerLen = 5

// ChunkSize is how much stream data one frame carries at most.
const ChunkSize = 32 << 10

// StdinWindow is how many stdin bytes the host may have in flight in one
// session before the guest acknowledges them (StdinAck). It keeps a
// workload that never reads its stdin from stalling the channel.
const StdinWindow = 256 << 10

// OutputWindow is how many bytes of output (stdout and stderr together)
// the guest may send in one session before the host acknowledges them
// (OutputAck): the host buffers no more than this for a session whose
// reader is slow, and the other sessions go on.
const OutputWindow = 256 << 10

// MaxSessions bounds the sessions open at once on one channel (the
// workload's, execs and controls), on both sides.
const MaxSessions = 256

// Type says what a frame carries.
type Type uint8

// Frame types. Host→guest: Hello, Boot, Exec, Control, Stdin, StdinClose,
// OutputAck, Resize, Signal, Bye. Guest→host: Hello, Started, Stdout,
// Stderr, StdinAck, Exit.
const (
	THello Type = iota + 1
	TBoot
	TExec
	TControl
	TStarted
	TStdin
	TStdinClose
	TStdinAck
	TStdout
	TStderr
	TOutputAck
	TResize
	TSignal
	TExit
	TBye
	tMax
)

var typeNames = [...]string{"", "hello", "boot", "exec", "control", "started", "stdin", "stdin-close", "stdin-ack",
	"stdout", "stderr", "output-ack", "resize", "signal", "exit", "bye"}

func (t Type) String() string {
	if t > 0 && t < tMax {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// FromGuest reports whether the guest may send frames of type t.
func (t Type) FromGuest() bool {
	switch t {
	case THello, TStarted, TStdout, TStderr, TStdinAck, TExit:
		return true
	}
	return false
}

// ErrFrame reports a malformed frame: a bad length or an unknown type.
var ErrFrame = errors.New("malformed frame")

// Frame is one decoded frame. Payload is only valid until the next Read.
type Frame struct {
	Type    Type
	Session uint32
	Payload []byte
}

// Reader decodes frames from a stream.
type Reader struct {
	r   io.Reader
	buf []byte
}

// NewReader returns a Reader over r, reading ahead through a buffer.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, 64<<10)}
}

// Read returns the next frame. It returns io.EOF only at a clean frame
// boundary, io.ErrUnexpectedEOF inside a frame, and ErrFrame for a frame that
// cannot be valid.
func (r *Reader) Read() (Frame, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r.r, hdr[:]); err != nil {
		return Frame{}, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < headerLen || n > MaxPayload+headerLen {
		return Frame{}, fmt.Errorf("%w: length %d", ErrFrame, n)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	b := r.buf[:n]
	if _, err := io.ReadFull(r.r, b); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	t := Type(b[0])
	if t == 0 || t >= tMax {
		return Frame{}, fmt.Errorf("%w: unknown type %d", ErrFrame, b[0])
	}
	return Frame{Type: t, Session: binary.BigEndian.Uint32(b[1:5]), Payload: b[headerLen:]}, nil
}

// Writer encodes frames onto a stream. It is safe for concurrent use: each
// frame is written whole.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
	b  []byte
}

// NewWriter returns a Writer onto w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write sends one frame of session id. Payloads over MaxPayload are
// refused.
func (w *Writer) Write(t Type, id uint32, payload []byte) error {
	return w.WriteThen(t, id, payload, nil)
}

// WriteThen sends one frame, as Write, and calls then (if set) while no
// other frame can be written: what then changes is seen by the peer with
// the frame, before any frame after it.
func (w *Writer) WriteThen(t Type, id uint32, payload []byte, then func()) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%w: payload of %d bytes", ErrFrame, len(payload))
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b = append(w.b[:0], 0, 0, 0, 0, byte(t), 0, 0, 0, 0)
	binary.BigEndian.PutUint32(w.b, uint32(len(payload)+headerLen))
	binary.BigEndian.PutUint32(w.b[5:], id)
	w.b = append(w.b, payload...)
	if then != nil {
		then()
	}
	_, err := w.w.Write(w.b)
	return err
}

// WriteJSON sends a control frame with v encoded as JSON.
func (w *Writer) WriteJSON(t Type, id uint32, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", t, err)
	}
	return w.Write(t, id, b)
}

// WriteStream sends p as a series of data frames of type t.
func (w *Writer) WriteStream(t Type, id uint32, p []byte) error {
	for len(p) > 0 {
		n := min(len(p), ChunkSize)
		if err := w.Write(t, id, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// Decode unmarshals a control frame's JSON payload into v.
func Decode(f Frame, v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("%w: %s payload: %v", ErrFrame, f.Type, err)
	}
	return nil
}

// Hello is the first frame each way, on session 0.
type Hello struct {
	Version int    `json:"version"`
	Agent   string `json:"agent,omitempty"` // the agent's build, for error messages
}

// Disk tells the guest which block device is which, by the serial the VMM
// gave it.
type Disk struct {
	Serial string `json:"serial"`
	FSType string `json:"fsType"`
}

// Process is a process to run: the workload (in Boot) or an exec.
type Process struct {
	Args  []string `json:"args"`            // argv; Args[0] is looked up in the workload's PATH
	Env   []string `json:"env,omitempty"`   // KEY=VALUE, already merged from the image and the user
	Dir   string   `json:"dir,omitempty"`   // working directory; created if missing
	User  string   `json:"user,omitempty"`  // name, uid, name:group or uid:gid, resolved in the image
	TTY   bool     `json:"tty,omitempty"`   //
	Rows  uint16   `json:"rows,omitempty"`  //
	Cols  uint16   `json:"cols,omitempty"`  //
	Stdin bool     `json:"stdin,omitempty"` // whether the host forwards stdin; else it is /dev/null
}

// Boot asks the guest to set up the root filesystem and run the workload:
// the first session, whose end is the VM's.
type Boot struct {
	Image    Disk   `json:"image"`              // read-only image filesystem
	Writable Disk   `json:"writable"`           // per-sandbox writable layer
	Hostname string `json:"hostname,omitempty"` //
	Time     int64  `json:"time,omitempty"`     // host wall clock, Unix nanoseconds
	// Network configures the guest's eth0; none leaves it down.
	Network *Network `json:"network,omitempty"`
	Process Process  `json:"process"`
}

// Network is the guest's side of its sandbox's network: a /32 address and
// a default route through the host's gateway, which is its DNS server too.
type Network struct {
	Address string   `json:"address"` // CIDR: "10.244.1.5/32"
	Gateway string   `json:"gateway"`
	DNS     []string `json:"dns,omitempty"`
	Search  []string `json:"search,omitempty"`
}

// Action is what a Control session does to the running sandbox.
type Action string

const (
	// Quiesce flushes the writable layer and freezes it, so that a
	// snapshot of its disk is consistent with the memory.
	Quiesce Action = "quiesce"
	// Thaw undoes Quiesce.
	Thaw Action = "thaw"
	// Restored tells a VM restored from a snapshot that it is a new
	// sandbox: it thaws the writable layer, sets the clock (Time) and
	// hostname (Hostname), gives the kernel's random pool the host's
	// Entropy and reseeds it (clones of one snapshot must never share a
	// random stream), gives /etc/machine-id a new value if the image has
	// one, and configures the network (Network). Every session but the
	// workload's ends (their host was the saved VM's), and the workload's
	// output credit is whole again (acknowledgements in flight when the
	// snapshot was taken went to the saved VM's host).
	Restored Action = "restored"
	// Migrated tells a VM that moved to another host's VMM that it is the
	// same sandbox with a new host: it sets the clock (Time; the guest
	// was paused for the switch), and, as Restored, ends every session
	// but the workload's (their host was the source's) and makes the
	// workload's output credit whole again; a workload that had already
	// exited has its Exit reported again (it went to the source's host,
	// which drops it once it has handed the sandbox over). With Network,
	// the interface takes the new host's address, gateway and DNS.
	// Hostname, random pool and machine-id stay as they were.
	Migrated Action = "migrated"
	// Probe succeeds if a TCP connection to 127.0.0.1:Port is accepted in
	// the guest (a template's readiness check).
	Probe Action = "probe"
)

// Control asks the guest to act on the running sandbox; the session's
// Exit reports how it went.
type Control struct {
	Action   Action   `json:"action"`
	Hostname string   `json:"hostname,omitempty"` // Restored
	Time     int64    `json:"time,omitempty"`     // Restored, Migrated
	Entropy  []byte   `json:"entropy,omitempty"`  // Restored
	Network  *Network `json:"network,omitempty"`  // Restored, Migrated
	Port     int      `json:"port,omitempty"`     // Probe
}

// Started reports that the session's process runs.
type Started struct {
	Pid int `json:"pid"`
}

// Resize changes the TTY's window size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Signal delivers a signal to the session's process.
type Signal struct {
	Signal int `json:"signal"`
}

// Ack returns window credit: StdinAck to the host, OutputAck to the guest.
type Ack struct {
	Bytes int `json:"bytes"`
}

// Exit reports how the session's process ended, or why it never started,
// and ends the session. For the workload's session the host acknowledges
// with Bye before the guest powers off.
type Exit struct {
	Code     int    `json:"code"`               // exit status as a shell reports it: 128+N for signal N
	Signal   int    `json:"signal,omitempty"`   // the signal that killed it, if any
	OOM      bool   `json:"oom,omitempty"`      // the guest's OOM killer ran during the workload
	DiskFull bool   `json:"diskFull,omitempty"` // the writable layer has no space left
	Error    string `json:"error,omitempty"`    // set when hearth-agent could not run the process
}
