package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
)

// fakeGuest is a guest agent in the test: it answers Hello, starts the
// workload, and runs each exec as "print its args and the session id,
// exit with its first arg's length" -- or, for "yes", as print "y" until
// the host says Bye; controls get no answer when silent.
// It reads and answers on a socket, buffered as the real channel is
// (net.Pipe is not: the host's Hello and Boot go out together).
func fakeGuest(t *testing.T, silent bool) (host net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	guest, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { guest.Close(); host.Close() })
	go func() {
		r, w := protocol.NewReader(guest), protocol.NewWriter(guest)
		var byes sync.Map // session id -> chan closed at its Bye
		for {
			f, err := r.Read()
			if err != nil {
				return
			}
			switch f.Type {
			case protocol.THello:
				_ = w.WriteJSON(protocol.THello, 0, protocol.Hello{Version: protocol.Version})
			case protocol.TBoot:
				_ = w.WriteJSON(protocol.TStarted, f.Session, protocol.Started{Pid: 1})
			case protocol.TExec:
				var p protocol.Process
				_ = protocol.Decode(f, &p)
				bye := make(chan struct{})
				byes.Store(f.Session, bye)
				go func(id uint32) {
					_ = w.WriteJSON(protocol.TStarted, id, protocol.Started{Pid: int(id)})
					for p.Args[0] == "yes" {
						select {
						case <-bye:
							return
						default:
							_ = w.Write(protocol.TStdout, id, []byte("y\n"))
						}
					}
					// Interleaved with the other sessions' output.
					for _, a := range p.Args {
						_ = w.Write(protocol.TStdout, id, []byte(a+" "))
						time.Sleep(time.Millisecond)
					}
					_ = w.Write(protocol.TStderr, id, []byte(fmt.Sprint(id)))
					_ = w.WriteJSON(protocol.TExit, id, protocol.Exit{Code: len(p.Args[0])})
				}(f.Session)
			case protocol.TBye:
				if bye, ok := byes.LoadAndDelete(f.Session); ok {
					close(bye.(chan struct{}))
				}
			case protocol.TControl:
				if !silent {
					_ = w.WriteJSON(protocol.TExit, f.Session, protocol.Exit{})
				}
			}
		}
	}()
	return host
}

// booted is a running sandbox against a fake guest, and how its workload
// session ended, once it has.
func booted(t *testing.T, silent bool) (*Running, func() error) {
	t.Helper()
	host := fakeGuest(t, silent)
	vm := &pipeVM{conn: host, done: make(chan struct{})}
	running := make(chan *Running, 1)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, err := bootSession(ctx, vm, host, IO{Stdout: &boundedWriter{}, Stderr: &boundedWriter{}, Running: func(r *Running) { running <- r }},
			protocol.Process{Args: []string{"sleep"}}, 5*time.Second)
		done <- err
	}()
	select {
	case r := <-running:
		return r, func() error { cancel(); return <-done }
	case err := <-done:
		t.Fatalf("the boot ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no running sandbox")
	}
	cancel()
	return nil, nil
}

// A guest that answers Hello and then says nothing does not hold a control
// action (and the snapshot waiting on it) forever.
func TestControlSilentGuest(t *testing.T) {
	defer func(d time.Duration) { controlTimeout = d }(controlTimeout)
	controlTimeout = 300 * time.Millisecond
	r, stop := booted(t, true)
	defer stop()
	start := time.Now()
	err := r.Control(context.Background(), protocol.Control{Action: protocol.Quiesce})
	if !errors.Is(err, ErrGuestProtocol) {
		t.Fatalf("Control against a silent guest: %v, want ErrGuestProtocol", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Control took %s with a %s limit", d, controlTimeout)
	}
}

// TestConcurrentSessions: many execs at once over the one channel, each
// with its own output and exit, while the workload runs on.
func TestConcurrentSessions(t *testing.T) {
	r, stop := booted(t, false)
	const n = 64
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out, errOut strings.Builder
			word := strings.Repeat("x", i%9+1)
			res, err := r.Exec(context.Background(), ExecSpec{Args: []string{word, "a", "b", fmt.Sprint(i)}},
				IO{Stdout: &syncBuilder{b: &out}, Stderr: &syncBuilder{b: &errOut}})
			if err != nil {
				t.Errorf("exec %d: %v", i, err)
				return
			}
			if want := word + " a b " + fmt.Sprint(i) + " "; out.String() != want || res.ExitCode != len(word) || errOut.Len() == 0 {
				t.Errorf("exec %d: stdout %q, stderr %q, exit %d; want %q and exit %d", i, out.String(), errOut.String(), res.ExitCode, want, len(word))
			}
		}()
	}
	wg.Wait()
	if err := r.Control(context.Background(), protocol.Control{Action: protocol.Thaw}); err != nil {
		t.Errorf("a control after the execs: %v", err)
	}
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("the workload's session ended with %v", err)
	}
	if r.Err() == nil {
		t.Error("the channel serves on after its sandbox ended")
	}
	if _, err := r.Exec(context.Background(), ExecSpec{Args: []string{"x"}}, IO{}); err == nil {
		t.Error("an exec into an ended sandbox succeeded")
	}
}

type syncBuilder struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (s *syncBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// TestSlowReaderIsolated: a session whose reader does not read stalls no
// other session (the channel's reader never waits on a session's sink).
func TestSlowReaderIsolated(t *testing.T) {
	r, stop := booted(t, false)
	defer stop()
	block := make(chan struct{})
	defer close(block)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		_, _ = r.Exec(ctx, ExecSpec{Args: []string{"slow", "output"}}, IO{Stdout: blockedWriter(block), Stderr: blockedWriter(block)})
	}()
	time.Sleep(50 * time.Millisecond)
	res, err := r.Exec(ctx, ExecSpec{Args: []string{"fast"}}, IO{Stdout: &boundedWriter{}, Stderr: &boundedWriter{}})
	if err != nil || res.ExitCode != 4 {
		t.Fatalf("an exec beside a stalled one: %v %+v", err, res)
	}
}

// blockedWriter blocks every write until its channel closes.
type blockedWriter chan struct{}

func (b blockedWriter) Write(p []byte) (int, error) { <-b; return len(p), nil }

// TestReaderGone: an exec whose output can no longer be written (its
// reader left, as with `| head`) ends with that error, and the guest is
// told to stop its process, which would otherwise write on forever.
func TestReaderGone(t *testing.T) {
	r, stop := booted(t, false)
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := r.Exec(ctx, ExecSpec{Args: []string{"yes"}}, IO{Stdout: &failingWriter{after: 3}, Stderr: &boundedWriter{}})
	var oe *OutputError
	if !errors.As(err, &oe) || !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("an exec whose reader left: %v, want an OutputError of EPIPE", err)
	}
	// The channel serves on.
	if res, err := r.Exec(ctx, ExecSpec{Args: []string{"ab"}}, IO{Stdout: &boundedWriter{}, Stderr: &boundedWriter{}}); err != nil || res.ExitCode != 2 {
		t.Fatalf("the next exec: %v %+v", err, res)
	}
}

// failingWriter takes after writes, then fails with EPIPE.
type failingWriter struct{ after int }

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.after == 0 {
		return 0, syscall.EPIPE
	}
	f.after--
	return len(p), nil
}
