package vmm

import (
	"strings"
	"testing"
)

func TestTailBuffer(t *testing.T) {
	tb := &TailBuffer{Max: 16}
	for _, s := range []string{"first line\n", "second\n", "third\n"} {
		if n, err := tb.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("write: %d %v", n, err)
		}
	}
	// 24 bytes written, 16 kept: the partial first line is dropped.
	if got := tb.Tail(100); got != "second\nthird" {
		t.Fatalf("tail: %q", got)
	}
	if got := tb.Tail(8); got != "third" {
		t.Fatalf("tail 8: %q", got)
	}
	small := &TailBuffer{Max: 64}
	small.Write([]byte("a\nb\n"))
	if got := small.Tail(100); got != "a\nb" {
		t.Fatalf("nothing dropped: %q", got)
	}
	// A flood keeps only its end, and no more than Max bytes.
	tb.Write([]byte(strings.Repeat("x", 1000) + "\nend"))
	if got := tb.Tail(100); got != "end" || len(tb.buf) != 16 {
		t.Fatalf("after flood: %q (%d bytes kept)", got, len(tb.buf))
	}
}
