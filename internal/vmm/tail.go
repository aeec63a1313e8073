package vmm

import (
	"strings"
	"sync"
)

// TailBuffer keeps the last Max bytes written to it. A VM's console and its
// VMM's output go into one each: the guest is untrusted and may print
// without end, so nothing it prints may grow without bound on the host.
type TailBuffer struct {
	Max int

	mu      sync.Mutex
	buf     []byte
	dropped bool // the start of buf is not the start of the output
}

// Write keeps the tail of p; it never fails.
func (t *TailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	if len(p) >= t.Max {
		p = p[len(p)-t.Max:]
		t.buf = t.buf[:0]
		t.dropped = true
	}
	if over := len(t.buf) + len(p) - t.Max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.dropped = true
	}
	t.buf = append(t.buf, p...)
	return n, nil
}

// Tail returns the last n bytes, starting at a line boundary where it
// had to cut, without the final newline.
func (t *TailBuffer) Tail(n int) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.buf
	cut := len(b) > n || t.dropped
	if len(b) > n {
		b = b[len(b)-n:]
	}
	s := string(b)
	if cut {
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			s = s[i+1:]
		}
	}
	return strings.TrimRight(s, "\r\n")
}
