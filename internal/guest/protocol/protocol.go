// Package protocol is the framed wire protocol between hearth on the host and
// hearth-agent (PID 1) in the guest. The same byte stream runs over a
// virtio-vsock connection or a virtio-serial port, so it carries its own
// framing, multiplexing (stdin, stdout, stderr, control) and flow control.
//
// A frame is a 4-byte big-endian length n, then n bytes: one type byte and
// the payload. Control messages carry JSON payloads; data frames carry raw
// bytes. The host speaks first, Hello and Start at once, so that nothing the
// guest writes can be lost before the host is listening on its end of the
// port, and the guest starts its work without a round trip.
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

// SerialPortName is the name of the virtio-serial port that carries the
// protocol where there is no vsock.
const SerialPortName = "hearth.0"

// ExecPorts is how many more ports (hearth.1 to hearth.N) carry exec
// sessions: each runs one more process in the running sandbox at a time,
// with the same protocol (Hello, then Start with Exec set). The host keeps
// the last three for itself (internal/sandbox: a forked sandbox's main
// command, and the control sessions around a snapshot). Each port costs
// the guest about 4 MiB of kernel memory (virtio_console fills its receive
// queue with page-sized buffers): with 8, a 64 MiB guest could not boot.
const ExecPorts = 5

// ExecPortName names exec port i (1 to ExecPorts).
func ExecPortName(i int) string { return fmt.Sprintf("hearth.%d", i) }

// PowerOffEnv set to 1 in the guest kernel's command line (which the kernel
// passes to init as environment) makes the agent power off as soon as it
// runs: a bare boot of hearth's own kernel and initramfs, for benchmarks.
const PowerOffEnv = "HEARTH_POWEROFF"

// Version is bumped on every incompatible change; both sides refuse a peer
// with another version during the handshake.
const Version = 4

// MaxPayload bounds one frame, so that a corrupt or hostile length cannot
// make the reader allocate without limit.
const MaxPayload = 1 << 20

// ChunkSize is how much stream data one frame carries at most.
const ChunkSize = 32 << 10

// StdinWindow is how many stdin bytes the host may have in flight before the
// guest acknowledges them (StdinAck). It keeps a workload that never reads
// its stdin from stalling control frames (signals, resizes) behind it.
const StdinWindow = 256 << 10

// Type says what a frame carries.
type Type uint8

// Frame types. Host→guest: Hello, Start, Stdin, StdinClose, Resize, Signal,
// Bye. Guest→host: Hello, Started, Stdout, Stderr, StdinAck, Exit.
const (
	THello Type = iota + 1
	TStart
	TStarted
	TStdin
	TStdinClose
	TStdinAck
	TStdout
	TStderr
	TResize
	TSignal
	TExit
	TBye
	tMax
)

var typeNames = [...]string{"", "hello", "start", "started", "stdin", "stdin-close", "stdin-ack", "stdout", "stderr", "resize", "signal", "exit", "bye"}

func (t Type) String() string {
	if t > 0 && t < tMax {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// ErrFrame reports a malformed frame: a bad length or an unknown type.
var ErrFrame = errors.New("malformed frame")

// Frame is one decoded frame. Payload is only valid until the next Read.
type Frame struct {
	Type    Type
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

// NewExactReader returns a Reader that never reads past the frame it
// returns (two reads a frame), for a stream that carries one session
// after another: the guest's exec ports, where a buffered reader could
// swallow the start of the next session with the end of the last one.
func NewExactReader(r io.Reader) *Reader {
	return &Reader{r: r}
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
	if n < 1 || n > MaxPayload+1 {
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
	return Frame{Type: t, Payload: b[1:]}, nil
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

// Write sends one frame. Payloads over MaxPayload are refused.
func (w *Writer) Write(t Type, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%w: payload of %d bytes", ErrFrame, len(payload))
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b = append(w.b[:0], 0, 0, 0, 0, byte(t))
	binary.BigEndian.PutUint32(w.b, uint32(len(payload)+1))
	w.b = append(w.b, payload...)
	_, err := w.w.Write(w.b)
	return err
}

// WriteJSON sends a control frame with v encoded as JSON.
func (w *Writer) WriteJSON(t Type, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", t, err)
	}
	return w.Write(t, b)
}

// WriteStream sends p as a series of data frames of type t.
func (w *Writer) WriteStream(t Type, p []byte) error {
	for len(p) > 0 {
		n := min(len(p), ChunkSize)
		if err := w.Write(t, p[:n]); err != nil {
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

// Hello is the first frame each way.
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

// Start asks the guest to set up the root filesystem and run the workload.
type Start struct {
	Image    Disk     `json:"image"`              // read-only image filesystem
	Writable Disk     `json:"writable"`           // per-sandbox writable layer
	Hostname string   `json:"hostname,omitempty"` //
	Args     []string `json:"args"`               // argv; Args[0] is looked up in the workload's PATH
	Env      []string `json:"env,omitempty"`      // KEY=VALUE, already merged from the image and the user
	Dir      string   `json:"dir,omitempty"`      // working directory; created if missing
	User     string   `json:"user,omitempty"`     // name, uid, name:group or uid:gid, resolved in the image
	TTY      bool     `json:"tty,omitempty"`
	Rows     uint16   `json:"rows,omitempty"`
	Cols     uint16   `json:"cols,omitempty"`
	Stdin    bool     `json:"stdin,omitempty"` // whether the host forwards stdin; else it is /dev/null
	Time     int64    `json:"time,omitempty"`  // host wall clock, Unix nanoseconds
	// Exec runs Args in the sandbox that already runs (an exec port's
	// session): the disks, hostname and clock are left as they are.
	Exec bool `json:"exec,omitempty"`
	// NoExecPorts, in the workload's Start, says that nobody will run
	// more processes in the sandbox (its caller took no target for exec or
	// snapshots): the agent opens no exec ports, which under TCG cost a
	// short workload tens of milliseconds.
	NoExecPorts bool `json:"noExecPorts,omitempty"`
	// Control, on an exec port, asks the agent to act on the sandbox
	// instead of running Args; the Exit reports how it went.
	Control Control `json:"control,omitempty"`
	// Entropy seeds the guest's random pool (Control Restored).
	Entropy []byte `json:"entropy,omitempty"`
	// Port is the TCP port that Control Probe connects to.
	Port int `json:"port,omitempty"`
	// Network configures the guest's eth0 (at the start, and again in a
	// VM restored from a snapshot: Control Restored); none leaves it down.
	Network *Network `json:"network,omitempty"`
}

// Network is the guest's side of its sandbox's network: a /32 address and
// a default route through the host's gateway, which is its DNS server too.
type Network struct {
	Address string   `json:"address"` // CIDR: "10.244.1.5/32"
	Gateway string   `json:"gateway"`
	DNS     []string `json:"dns,omitempty"`
	Search  []string `json:"search,omitempty"`
}

// Control is an action on a running sandbox, for snapshots.
type Control string

const (
	// Quiesce flushes the writable layer and freezes it, so that a
	// snapshot of its disk is consistent with the memory.
	Quiesce Control = "quiesce"
	// Thaw undoes Quiesce.
	Thaw Control = "thaw"
	// Restored tells a VM restored from a snapshot that it is a new
	// sandbox: it thaws the writable layer, sets the clock (Time) and
	// hostname (Hostname), gives the kernel's random pool the host's
	// Entropy and reseeds it (clones of one snapshot must never share a
	// random stream), and gives /etc/machine-id a new value if the image
	// has one.
	Restored Control = "restored"
	// Probe succeeds if a TCP connection to 127.0.0.1:Port is accepted in
	// the guest (a template's readiness check).
	Probe Control = "probe"
)

// Started reports that the workload runs.
type Started struct {
	Pid int `json:"pid"`
}

// Resize changes the TTY's window size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Signal delivers a signal to the workload.
type Signal struct {
	Signal int `json:"signal"`
}

// StdinAck returns stdin window credit to the host.
type StdinAck struct {
	Bytes int `json:"bytes"`
}

// Exit reports how the workload ended, or why it never started. The host
// acknowledges with Bye before the guest powers off.
type Exit struct {
	Code     int    `json:"code"`               // exit status as a shell reports it: 128+N for signal N
	Signal   int    `json:"signal,omitempty"`   // the signal that killed it, if any
	OOM      bool   `json:"oom,omitempty"`      // the guest's OOM killer ran during the workload
	DiskFull bool   `json:"diskFull,omitempty"` // the writable layer has no space left
	Error    string `json:"error,omitempty"`    // set when hearth-agent could not run the workload
}
