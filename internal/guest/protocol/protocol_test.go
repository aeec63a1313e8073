package protocol

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	big := bytes.Repeat([]byte("x"), ChunkSize*2+7)
	if err := w.WriteJSON(THello, 0, Hello{Version: Version}); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteStream(TStdout, 7, big); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(TStdinClose, 7, nil); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&buf)
	f, err := r.Read()
	if err != nil || f.Type != THello {
		t.Fatalf("first frame: %v %v", f.Type, err)
	}
	var h Hello
	if err := Decode(f, &h); err != nil || h.Version != Version {
		t.Fatalf("hello: %+v %v", h, err)
	}
	var got []byte
	var sizes []int
	for {
		f, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		if f.Type != TStdout {
			if f.Type != TStdinClose || len(f.Payload) != 0 {
				t.Fatalf("last frame: %v %q", f.Type, f.Payload)
			}
			break
		}
		sizes = append(sizes, len(f.Payload))
		got = append(got, f.Payload...)
	}
	if !bytes.Equal(got, big) || f.Session != 0 {
		t.Fatalf("stream differs: %d bytes, want %d", len(got), len(big))
	}
	if want := []int{ChunkSize, ChunkSize, 7}; len(sizes) != 3 || sizes[0] != want[0] || sizes[2] != want[2] {
		t.Fatalf("chunks %v, want %v", sizes, want)
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("at end: %v, want EOF", err)
	}
}

func TestMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"zero length", []byte{0, 0, 0, 0}, ErrFrame},
		{"no session id", []byte{0, 0, 0, 1, byte(TStdout)}, ErrFrame},
		{"too long", []byte{0xff, 0, 0, 0, 1}, ErrFrame},
		{"unknown type", []byte{0, 0, 0, 5, 99, 0, 0, 0, 1}, ErrFrame},
		{"type zero", []byte{0, 0, 0, 5, 0, 0, 0, 0, 1}, ErrFrame},
		{"truncated header", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"truncated payload", []byte{0, 0, 0, 9, byte(TStdout), 0, 0, 0, 1, 'a'}, io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewReader(bytes.NewReader(tc.in)).Read()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if err := NewWriter(io.Discard).Write(TStdout, 1, make([]byte, MaxPayload+1)); !errors.Is(err, ErrFrame) {
		t.Fatalf("oversized write: %v", err)
	}
	var e Exit
	if err := Decode(Frame{Type: TExit, Payload: []byte("{")}, &e); !errors.Is(err, ErrFrame) {
		t.Fatalf("bad json: %v", err)
	}
}

// FuzzReader feeds arbitrary bytes to the decoder: it must never panic,
// never return a frame longer than MaxPayload or of an unknown type, and a
// frame it accepts must encode back to the same bytes.
func FuzzReader(f *testing.F) {
	var seed bytes.Buffer
	w := NewWriter(&seed)
	_ = w.WriteJSON(TBoot, 1, Boot{Process: Process{Args: []string{"sh"}, Env: []string{"A=B"}}})
	_ = w.Write(TStdin, 1, []byte("hello"))
	f.Add(seed.Bytes())
	f.Add([]byte{0, 0, 0, 5, byte(TBye), 0, 0, 0, 1})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data))
		consumed := 0
		for {
			fr, err := r.Read()
			if err != nil {
				return
			}
			if fr.Type == 0 || fr.Type >= tMax || len(fr.Payload) > MaxPayload {
				t.Fatalf("accepted bad frame %v len %d", fr.Type, len(fr.Payload))
			}
			var out bytes.Buffer
			if err := NewWriter(&out).Write(fr.Type, fr.Session, fr.Payload); err != nil {
				t.Fatal(err)
			}
			n := out.Len()
			if !bytes.Equal(out.Bytes(), data[consumed:consumed+n]) {
				t.Fatalf("re-encoding differs")
			}
			consumed += n
			// Control payloads must decode or fail cleanly.
			var b Boot
			_ = Decode(fr, &b)
		}
	})
}
