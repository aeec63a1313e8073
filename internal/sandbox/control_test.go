package sandbox

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/vmm"
)

// dialOnly is a driver whose channels are given pipes; nothing else of it
// is called.
type dialOnly struct {
	vmm.Driver
	conn net.Conn
}

func (d dialOnly) Dial(context.Context, string, int) (net.Conn, error) { return d.conn, nil }

// A guest that answers Hello and then says nothing does not hold a control
// action (and the snapshot controller waiting on it) forever.
func TestControlSilentGuest(t *testing.T) {
	defer func(d time.Duration) { controlTimeout = d }(controlTimeout)
	controlTimeout = 300 * time.Millisecond
	// A socket, buffered as the real channel is (net.Pipe is not: the
	// host's Hello and Start go out together).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	guest, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	go func() {
		r, w := protocol.NewReader(guest), protocol.NewWriter(guest)
		if _, err := r.Read(); err != nil { // Hello
			return
		}
		_ = w.WriteJSON(protocol.THello, protocol.Hello{Version: protocol.Version})
		for { // Start, and whatever else: read, never answer
			if _, err := r.Read(); err != nil {
				return
			}
		}
	}()
	start := time.Now()
	err = Control(context.Background(), dialOnly{conn: host}, Target{RunDir: t.TempDir()}, quiescePort, protocol.Start{Control: protocol.Quiesce})
	if !errors.Is(err, ErrGuestProtocol) {
		t.Fatalf("Control against a silent guest: %v, want ErrGuestProtocol", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Control took %s with a %s limit", d, controlTimeout)
	}
}
