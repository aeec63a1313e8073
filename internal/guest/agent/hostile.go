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
// must end the session (and the sandbox, with GuestProtocolError, where
// the protocol was broken) and nothing else.
var scenarios = map[string]func(s *session){
	// A negative stdin acknowledgement (it once panicked the host).
	"negative-ack": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.WriteJSON(protocol.TStdinAck, protocol.StdinAck{Bytes: -1 << 20})
	},
	// An acknowledgement of more than was ever sent.
	"huge-ack": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.WriteJSON(protocol.TStdinAck, protocol.StdinAck{Bytes: 1 << 40})
	},
	// A frame header announcing more than the limit.
	"over-limit": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		var hdr [5]byte
		binary.BigEndian.PutUint32(hdr[:4], protocol.MaxPayload+2)
		hdr[4] = byte(protocol.TStdout)
		_, _ = s.port.Write(hdr[:])
	},
	// Frames exactly at the limit are allowed: then a clean exit.
	"at-limit": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.Write(protocol.TStdout, make([]byte, protocol.MaxPayload))
		exit(s, protocol.Exit{Code: 0})
	},
	// 64 MiB of output as fast as it goes, then a clean exit.
	"flood": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		chunk := []byte(strings.Repeat("flood\n", protocol.ChunkSize/6))
		for range (64 << 20) / len(chunk) {
			if s.w.Write(protocol.TStdout, chunk) != nil {
				return
			}
		}
		exit(s, protocol.Exit{Code: 0})
	},
	// An exit no process can have had.
	"false-exit": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.WriteJSON(protocol.TExit, protocol.Exit{Code: -1, Signal: 1000})
	},
	// An exit whose message is a megabyte: the API keeps 1 KiB of it.
	"long-message": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		exit(s, protocol.Exit{Code: 3, Error: strings.Repeat("é", (protocol.MaxPayload-64)/2)})
	},
	// A frame of a type that does not exist.
	"unknown-type": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.Write(200, []byte("?"))
	},
	// Replies for a session that was never opened: frames of the host's
	// own kinds, and a second Hello.
	"wrong-direction": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_ = s.w.WriteJSON(protocol.THello, protocol.Hello{Version: protocol.Version})
		_ = s.w.WriteJSON(protocol.TStart, protocol.Start{Args: []string{"x"}})
		_ = s.w.Write(protocol.TBye, nil)
		_ = s.w.Write(protocol.TExit, []byte(`{"code":`))
	},
	// Half a frame, then nothing.
	"half-frame": func(s *session) {
		_ = s.w.Write(protocol.TStarted, nil)
		_, _ = s.port.Write([]byte{0, 0})
	},
}

// exit reports e and waits for the host's Bye, as serve does.
func exit(s *session, e protocol.Exit) {
	_ = s.w.WriteJSON(protocol.TExit, e)
	select {
	case <-s.bye:
	case <-time.After(5 * time.Second):
	}
}

// hostile runs the scenario st names, if it names one, and then keeps
// the session's port as it left it for a minute (a guest that breaks the
// protocol and stays up); it reports whether it did.
func hostile(s *session, st *protocol.Start) bool {
	if len(st.Args) == 0 || !strings.HasPrefix(st.Args[0], "hostile:") {
		return false
	}
	run, ok := scenarios[strings.TrimPrefix(st.Args[0], "hostile:")]
	if !ok {
		return false
	}
	s.bye = make(chan struct{})
	go s.control()
	run(s)
	select {
	case <-s.bye:
	case <-time.After(time.Minute):
	}
	return true
}
