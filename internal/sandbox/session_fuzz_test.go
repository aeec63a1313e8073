package sandbox

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
)

// pipeVM is a VM whose guest agent is the test: Channel is the host's end
// of a pipe, and the VM ends when the test closes done.
type pipeVM struct {
	conn net.Conn
	done chan struct{}
}

func (v *pipeVM) Channel(context.Context) (net.Conn, error) { return v.conn, nil }
func (v *pipeVM) Wait(ctx context.Context) error {
	select {
	case <-v.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
func (v *pipeVM) Logs(int) string { return "" }

// frames encodes frames as a guest would send them.
func frames(fs ...protocol.Frame) []byte {
	var b bytes.Buffer
	w := protocol.NewWriter(&b)
	for _, f := range fs {
		_ = w.Write(f.Type, f.Session, f.Payload)
	}
	return b.Bytes()
}

// jsonFrame is a frame of the workload's session (1).
func jsonFrame(t protocol.Type, payload string) protocol.Frame {
	return protocol.Frame{Type: t, Session: workloadSession, Payload: []byte(payload)}
}

// guestHello is the guest's Hello, on session 0.
func guestHello() protocol.Frame {
	return protocol.Frame{Type: protocol.THello, Payload: []byte(`{"version":` + strconv.Itoa(protocol.Version) + `}`)}
}

// bootSession runs the host's side of a boot over conn, against a guest
// on its other end.
func bootSession(ctx context.Context, vm guestVM, conn net.Conn, sio IO, p protocol.Process, limit time.Duration) (*Result, error) {
	log := slog.New(slog.DiscardHandler)
	return serveBoot(ctx, vm, conn, protocol.Boot{Process: p}, sio, limit, time.Now(), log,
		func(ch *channel) *Running { return &Running{ch: ch, log: log} })
}

// boundedWriter counts what it is given, like a client that reads.
type boundedWriter struct{ n int }

func (w *boundedWriter) Write(p []byte) (int, error) { w.n += len(p); return len(p), nil }

// drain reads whatever the host sends, as an agent that reads, until c
// closes.
func drain(c net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

// hostSession runs the host's side of one session with stdin, against a
// guest that sends guest and closes; it returns what the host returned.
func hostSession(t *testing.T, guest []byte) (*Result, error, int) {
	host, agent := net.Pipe()
	vm := &pipeVM{conn: host, done: make(chan struct{})}
	go drain(agent)
	go func() {
		_, _ = agent.Write(guest)
		agent.Close()
		close(vm.done)
	}()
	var out, errOut boundedWriter
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := bootSession(ctx, vm, host, IO{Stdout: &out, Stderr: &errOut, Stdin: strings.NewReader(strings.Repeat("x", 300<<10))},
		protocol.Process{Stdin: true, Args: []string{"sh"}}, 2*time.Second)
	if ctx.Err() != nil {
		t.Fatalf("the session outlived a guest that had closed: %v", err)
	}
	return res, err, out.n + errOut.n
}

// FuzzSession feeds the host's session code whatever a guest may send:
// it must end (no panic, no hang) with a result or an error, and pass on
// no more output than the guest sent. CI runs it for a short while
// (make test); go test -fuzz=FuzzSession ./internal/sandbox runs it on.
func FuzzSession(f *testing.F) {
	hello := guestHello()
	started := protocol.Frame{Type: protocol.TStarted, Session: workloadSession}
	f.Add(frames(hello, started, protocol.Frame{Type: protocol.TStdout, Session: workloadSession, Payload: []byte("hi\n")}, jsonFrame(protocol.TExit, `{"code":0}`)))
	f.Add(frames(hello, started, protocol.Frame{Type: protocol.TStdout, Session: 7, Payload: []byte("hi\n")}))
	f.Add(frames(hello, started, protocol.Frame{Type: protocol.TStdout, Session: workloadSession, Payload: make([]byte, protocol.OutputWindow+1)}))
	f.Add(frames(hello, started, jsonFrame(protocol.TStdinAck, `{"bytes":-1048576}`)))
	f.Add(frames(hello, started, jsonFrame(protocol.TStdinAck, `{"bytes":262144}`), jsonFrame(protocol.TStdinAck, `{"bytes":262144}`)))
	f.Add(frames(hello, started, jsonFrame(protocol.TExit, `{"code":-7,"signal":99}`)))
	f.Add(frames(hello, jsonFrame(protocol.TExit, `{"code":`)))
	f.Add(frames(protocol.Frame{Type: protocol.THello, Payload: []byte(`{"version":1}`)}))
	f.Add(append(frames(hello, started), 0xff, 0xff, 0xff, 0xff))
	f.Add(append(frames(hello, started), 0, 0, 0, 9, byte(protocol.TStdout), 0, 0, 0, 1, 'a'))
	f.Add(frames(hello, protocol.Frame{Type: 200, Session: workloadSession}))
	f.Fuzz(func(t *testing.T, guest []byte) {
		res, err, passed := hostSession(t, guest)
		if res == nil && err == nil {
			t.Fatal("no result and no error")
		}
		if passed > len(guest) {
			t.Errorf("passed on %d bytes of output from %d bytes sent", passed, len(guest))
		}
		if res != nil && (res.ExitCode < 0 || res.ExitCode > 255 || res.Signal < 0 || res.Signal > 64) {
			t.Errorf("took exit code %d, signal %d from the guest", res.ExitCode, res.Signal)
		}
	})
}

// TestHostileFrames: each way of breaking the protocol ends the session
// with ErrGuestProtocol.
func TestHostileFrames(t *testing.T) {
	hello := guestHello()
	started := protocol.Frame{Type: protocol.TStarted, Session: workloadSession}
	stdout := func(id uint32, n int) protocol.Frame {
		return protocol.Frame{Type: protocol.TStdout, Session: id, Payload: make([]byte, n)}
	}
	for name, guest := range map[string][]byte{
		"output past the window":  frames(hello, started, stdout(workloadSession, protocol.OutputWindow+1)),
		"output before started":   frames(hello, stdout(workloadSession, 1)),
		"a session never opened":  frames(hello, started, stdout(2, 1)),
		"frames on session 0":     frames(hello, started, protocol.Frame{Type: protocol.TStdout}),
		"a second hello":          frames(hello, started, protocol.Frame{Type: protocol.THello, Session: workloadSession, Payload: []byte(`{}`)}),
		"a frame only hosts send": frames(hello, started, protocol.Frame{Type: protocol.TBoot, Session: workloadSession, Payload: []byte(`{}`)}),
		"output ack from a guest": frames(hello, started, jsonFrame(protocol.TOutputAck, `{"bytes":1}`)),
		"negative ack":            frames(hello, started, jsonFrame(protocol.TStdinAck, `{"bytes":-1}`)),
		"ack beyond sent":         frames(hello, started, jsonFrame(protocol.TStdinAck, `{"bytes":1073741824}`)),
		"bad exit JSON":           frames(hello, started, jsonFrame(protocol.TExit, `{"code":"x"}`)),
		"exit code 256":           frames(hello, started, jsonFrame(protocol.TExit, `{"code":256}`)),
		"negative signal":         frames(hello, started, jsonFrame(protocol.TExit, `{"code":1,"signal":-9}`)),
		"unknown type":            frames(hello, started, protocol.Frame{Type: 77, Session: workloadSession}),
		"length over max":         append(frames(hello, started), 0x7f, 0xff, 0xff, 0xff),
		"zero length":             append(frames(hello, started), 0, 0, 0, 0),
		"no hello":                frames(started, jsonFrame(protocol.TExit, `{"code":0}`)),
		"bad hello":               frames(protocol.Frame{Type: protocol.THello, Payload: []byte(`{"version":"four"}`)}),
		"hello on a session":      frames(jsonFrame(protocol.THello, `{"version":`+strconv.Itoa(protocol.Version)+`}`)),
		"bad first frame":         {0xff, 0xff, 0xff, 0xff},
	} {
		t.Run(name, func(t *testing.T) {
			_, err, _ := hostSession(t, guest)
			if !errors.Is(err, ErrGuestProtocol) {
				t.Errorf("got %v, want ErrGuestProtocol", err)
			}
		})
	}
}

// TestSilentAfterHello: a guest that answers Hello and then never starts
// the workload ends its run within the boot limit.
func TestSilentAfterHello(t *testing.T) {
	host, agent := net.Pipe()
	defer agent.Close()
	go drain(agent)
	go func() {
		_, _ = agent.Write(frames(guestHello()))
	}()
	vm := &pipeVM{conn: host, done: make(chan struct{})}
	start := time.Now()
	_, err := bootSession(context.Background(), vm, host, IO{Stdout: &boundedWriter{}, Stderr: &boundedWriter{}},
		protocol.Process{Args: []string{"sh"}}, 300*time.Millisecond)
	if !errors.Is(err, ErrGuestProtocol) {
		t.Fatalf("got %v, want ErrGuestProtocol", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %s with a 300 ms limit", d)
	}
}
