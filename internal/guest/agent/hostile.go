//go:build linux && hostile

package agent

import (
	"encoding/binary"
	"strings"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
)

// Built with -tags hostile (the e2e tests' hostile guest only), the agent
// breaks the protocol on request: a session whose command is
// "hostile:NAME" runs scenario NAME against the host instead of the
// command, and every other session is served as usual, so one binary
// gives a host hostile and well-behaved sandboxes side by side.
//
// Each scenario is what an attacker who owns the guest may send; the host
// must end the sandbox (with GuestProtocolError, where the protocol was
// broken) and nothing else.
var scenarios = map[string]func(s *session){
	// A negative stdin acknowledgement (it once panicked the host).
	"negative-ack": func(s *session) {
		started(s)
		_ = s.c.w.WriteJSON(protocol.TStdinAck, s.id, protocol.Ack{Bytes: -1 << 20})
	},
	// An acknowledgement of more than was ever sent.
	"huge-ack": func(s *session) {
		started(s)
		_ = s.c.w.WriteJSON(protocol.TStdinAck, s.id, protocol.Ack{Bytes: 1 << 40})
	},
	// A frame header announcing more than the limit.
	"over-limit": func(s *session) {
		started(s)
		var hdr [9]byte
		binary.BigEndian.PutUint32(hdr[:4], protocol.MaxPayload+6)
		hdr[4] = byte(protocol.TStdout)
		binary.BigEndian.PutUint32(hdr[5:], s.id)
		_, _ = s.c.port.Write(hdr[:])
	},
	// A whole output window in one frame is allowed: then a clean exit.
	"at-limit": func(s *session) {
		started(s)
		_ = s.c.w.Write(protocol.TStdout, s.id, make([]byte, protocol.OutputWindow))
		exit(s, protocol.Exit{Code: 0})
	},
	// Output past the window: a frame four times its size.
	"past-window": func(s *session) {
		started(s)
		_ = s.c.w.Write(protocol.TStdout, s.id, make([]byte, 4*protocol.OutputWindow))
	},
	// 64 MiB of output as fast as the window lets it go, then a clean
	// exit.
	"flood": func(s *session) {
		started(s)
		chunk := []byte(strings.Repeat("flood\n", protocol.ChunkSize/6))
		for range (64 << 20) / len(chunk) {
			for p := chunk; len(p) > 0; {
				k := s.out.take(len(p))
				if k == 0 || s.c.w.WriteThen(protocol.TStdout, s.id, p[:k], func() { s.out.commit(k, k) }) != nil {
					return
				}
				p = p[k:]
			}
		}
		exit(s, protocol.Exit{Code: 0})
	},
	// An exit no process can have had.
	"false-exit": func(s *session) {
		started(s)
		_ = s.c.w.WriteJSON(protocol.TExit, s.id, protocol.Exit{Code: -1, Signal: 1000})
	},
	// An exit whose message is a megabyte: the API keeps 1 KiB of it.
	"long-message": func(s *session) {
		started(s)
		exit(s, protocol.Exit{Code: 3, Error: strings.Repeat("é", (protocol.MaxPayload-64)/2)})
	},
	// A frame of a type that does not exist.
	"unknown-type": func(s *session) {
		started(s)
		_ = s.c.w.Write(200, s.id, []byte("?"))
	},
	// Frames of the host's own kinds: a second Hello, a Boot, a Bye.
	"wrong-direction": func(s *session) {
		started(s)
		_ = s.c.w.WriteJSON(protocol.THello, s.id, protocol.Hello{Version: protocol.Version})
		_ = s.c.w.WriteJSON(protocol.TBoot, s.id, protocol.Boot{})
		_ = s.c.w.Write(protocol.TBye, s.id, nil)
	},
	// Replies on a session the host never opened.
	"unopened-session": func(s *session) {
		started(s)
		_ = s.c.w.Write(protocol.TStdout, s.id+1000, []byte("not yours"))
		_ = s.c.w.WriteJSON(protocol.TExit, s.id+1000, protocol.Exit{})
	},
	// Half a frame, then nothing.
	"half-frame": func(s *session) {
		started(s)
		_, _ = s.c.port.Write([]byte{0, 0})
	},
}

func started(s *session) { _ = s.c.w.WriteJSON(protocol.TStarted, s.id, protocol.Started{Pid: 1}) }

// exit reports e and, for the workload, waits for the host's Bye, as
// boot does.
func exit(s *session, e protocol.Exit) {
	_ = s.c.w.WriteJSON(protocol.TExit, s.id, e)
	if s == s.c.workload {
		select {
		case <-s.c.bye:
		case <-time.After(5 * time.Second):
		}
	}
}

// hostile runs the scenario p names, if it names one, and then keeps the
// channel as it left it for a minute (a guest that breaks the protocol
// and stays up); it reports whether it did.
func hostile(s *session, p *protocol.Process) bool {
	if len(p.Args) == 0 || !strings.HasPrefix(p.Args[0], "hostile:") {
		return false
	}
	run, ok := scenarios[strings.TrimPrefix(p.Args[0], "hostile:")]
	if !ok {
		return false
	}
	run(s)
	select {
	case <-s.c.bye:
	case <-time.After(time.Minute):
	}
	return true
}
