package logfile

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestRotateAndRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	w, err := Open(path, 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n"} {
		if _, err := w.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	// The cap keeps the current file and one rotated one: 20 bytes of 30.
	var out bytes.Buffer
	if err := Read(context.Background(), path, &out, false, nil); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); got != "cccc\ndddd\neeee\nffff\n" {
		t.Errorf("read %q, want the last four lines", got)
	}
	if _, err := os.Stat(path + ".1"); err != nil {
		t.Errorf("no rotated file: %v", err)
	}
}

func TestFollowAcrossRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	w, err := Open(path, 8)
	if err != nil {
		t.Fatal(err)
	}
	var finished atomic.Bool
	var out bytes.Buffer // written by Read's goroutine only, read after it returns
	errc := make(chan error, 1)
	go func() { errc <- Read(context.Background(), path, &out, true, finished.Load) }()
	for i := range 5 {
		w.Write([]byte{'a' + byte(i), 'x', 'x', 'x', 'x', '\n'})
		time.Sleep(150 * time.Millisecond)
	}
	w.Close()
	finished.Store(true)
	select {
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("follow did not end after the writer finished")
	}
	if got, want := out.String(), "axxxx\nbxxxx\ncxxxx\ndxxxx\nexxxx\n"; got != want {
		t.Errorf("followed %q, want %q", got, want)
	}
	if strings.Count(out.String(), "\n") != 5 {
		t.Error("lines lost or repeated")
	}
}
