// Package logfile keeps a sandbox's output on its host: one file per run,
// capped in size by rotation (the current file and one rotated one, as the
// kubelet keeps container logs), and read back, following as it grows,
// for `hearth logs` and the API's sandboxes/log.
package logfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// Writer appends to a log file and rotates it when it passes Max bytes: the
// file moves to PATH.1 (replacing an older one) and a new one starts.
type Writer struct {
	Path string
	Max  int64

	mu   sync.Mutex
	f    *os.File
	size int64
}

// Open opens (appending) the log at path.
func Open(path string, max int64) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Writer{Path: path, Max: max, f: f, size: fi.Size()}, nil
}

func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return 0, os.ErrClosed
	}
	if w.Max > 0 && w.size+int64(len(p)) > w.Max && w.size > 0 {
		if err := w.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := w.f.Write(p)
	w.size += int64(n)
	return n, err
}

func (w *Writer) rotate() error {
	if err := w.f.Close(); err != nil {
		return err
	}
	if err := os.Rename(w.Path, w.Path+".1"); err != nil {
		return fmt.Errorf("rotate log: %w", err)
	}
	f, err := os.OpenFile(w.Path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		w.f = nil
		return err
	}
	w.f, w.size = f, 0
	return nil
}

// Close closes the file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}

// Read copies the log at path to out: the rotated part, then the current
// file. With follow it then waits for more, across rotations, until done
// returns true after a last read, or ctx ends.
func Read(ctx context.Context, path string, out io.Writer, follow bool, done func() bool) error {
	return read(ctx, path, out, follow, false, done)
}

// Tail copies what is written to the log at path from now on, until done
// returns true after a last read, or ctx ends.
func Tail(ctx context.Context, path string, out io.Writer, done func() bool) error {
	return read(ctx, path, out, true, true, done)
}

func read(ctx context.Context, path string, out io.Writer, follow, fromEnd bool, done func() bool) error {
	if f, err := os.Open(path + ".1"); err == nil && !fromEnd {
		_, err = io.Copy(out, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !follow {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	if f != nil && fromEnd {
		if _, err := f.Seek(0, io.SeekEnd); err != nil {
			return err
		}
	}
	flush := func() {
		if fl, ok := out.(interface{ Flush() }); ok {
			fl.Flush()
		}
	}
	for {
		if f != nil {
			if _, err := io.Copy(out, f); err != nil {
				return err
			}
		}
		if !follow {
			return nil
		}
		flush()
		finished := done()
		// A rotation (or the file's creation) replaced what we read:
		// finish the old file and go on with the new one.
		if cur, err := os.Stat(path); err == nil {
			if st, err2 := fstat(f); f == nil || err2 != nil || !os.SameFile(cur, st) {
				if f != nil {
					if _, err := io.Copy(out, f); err != nil {
						return err
					}
					f.Close()
				}
				if f, err = os.Open(path); err != nil {
					return err
				}
				continue
			}
		}
		if finished {
			if f != nil {
				_, err := io.Copy(out, f)
				return err
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func fstat(f *os.File) (os.FileInfo, error) {
	if f == nil {
		return nil, os.ErrNotExist
	}
	return f.Stat()
}
