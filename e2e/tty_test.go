package e2e

import (
	"bytes"
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
)

// screen collects what a pty shows.
type screen struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *screen) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *screen) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// waitFor waits until the screen shows want after offset, and returns the
// offset just past it.
func (s *screen) waitFor(t *testing.T, from int, want string) int {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		out := s.String()
		if i := strings.Index(out[from:], want); i >= 0 {
			return from + i + len(want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the terminal never showed %q; it shows:\n%s", want, s.String()[from:])
	return 0
}

// TestTTY drives an interactive shell through a real pty, as a person at a
// terminal would: prompt, command, window resize, exit status.
func TestTTY(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := h.command(ctx, "run", "--rm", "-it", img, "--", "sh")
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 24, Cols: 80})
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	var scr screen
	go func() { _, _ = bytesCopy(&scr, ptmx) }()

	at := scr.waitFor(t, 0, "# ")
	_, _ = ptmx.WriteString("stty size; tty\r")
	at = scr.waitFor(t, at, "24 80")
	at = scr.waitFor(t, at, "/dev/pts/0")
	at = scr.waitFor(t, at, "# ")

	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 100}); err != nil {
		t.Fatal(err)
	}
	// The resize reaches the guest asynchronously; ask until it shows.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, _ = ptmx.WriteString("stty size\r")
		time.Sleep(300 * time.Millisecond)
		if strings.Contains(scr.String()[at:], "40 100") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("resize never reached the guest:\n%s", scr.String()[at:])
		}
	}
	_, _ = ptmx.WriteString("exit 5\r")
	err = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 5 {
		t.Fatalf("exit %d (%v), want 5; screen:\n%s", code, err, scr.String())
	}
}

func bytesCopy(dst *screen, src *os.File) (int64, error) {
	buf := make([]byte, 4096)
	var n int64
	for {
		k, err := src.Read(buf)
		if k > 0 {
			_, _ = dst.Write(buf[:k])
			n += int64(k)
		}
		if err != nil {
			return n, err
		}
	}
}
