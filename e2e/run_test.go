package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/testenv"
)

// tools pushes the busybox test image and returns its reference.
func tools(t *testing.T) string {
	reg := testenv.StartRegistry(t)
	return reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}), "tools:1")
}

func TestExitCodes(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	for _, tc := range []struct {
		name      string
		args      []string
		code      int
		stdout    string
		stderrHas []string
	}{
		{"exit 3", []string{img, "--", "sh", "-c", "echo hello; exit 3"}, 3, "hello\n", nil},
		{"true", []string{img, "true"}, 0, "", nil},
		{"not found", []string{img, "no-such-command"}, 127, "", []string{`exec "no-such-command": executable file not found in $PATH`}},
		{"not executable", []string{img, "/etc/passwd"}, 126, "", []string{"permission denied"}},
		{"killed by SIGTERM", []string{img, "sh", "-c", "kill -TERM $$"}, 128 + 15, "", nil},
		{"OOM", []string{"--memory", "64M", img, "sh", "-c", `x=$(head -c 200000000 /dev/zero | tr "\0" a); echo survived`}, 137, "",
			[]string{"killed by the guest's OOM killer"}},
		{"disk full", []string{"--disk", "16M", img, "dd", "if=/dev/zero", "of=/big", "bs=1M"}, 1, "",
			[]string{"No space left on device", "writable disk is full (--disk 16M)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := h.run("", append([]string{"run"}, tc.args...)...)
			if r.code != tc.code {
				t.Errorf("exit %d, want %d; stderr: %s", r.code, tc.code, r.stderr)
			}
			if r.stdout != tc.stdout {
				t.Errorf("stdout %q, want %q", r.stdout, tc.stdout)
			}
			for _, s := range tc.stderrHas {
				if !strings.Contains(r.stderr, s) {
					t.Errorf("stderr %q lacks %q", r.stderr, s)
				}
			}
		})
	}
}

func TestStreams(t *testing.T) {
	h := newHarness(t)
	img := tools(t)

	r := h.run("", "run", img, "sh", "-c", "echo out; echo err >&2; echo out2")
	if r.code != 0 || r.stdout != "out\nout2\n" || r.stderr != "err\n" {
		t.Errorf("stdout %q stderr %q code %d", r.stdout, r.stderr, r.code)
	}

	r = h.run("data\n", "run", "-i", img, "--", "wc", "-c")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "5" {
		t.Errorf("stdin: stdout %q stderr %q code %d", r.stdout, r.stderr, r.code)
	}
	// Without -i the workload's stdin is empty.
	r = h.run("data\n", "run", img, "--", "wc", "-c")
	if strings.TrimSpace(r.stdout) != "0" {
		t.Errorf("stdin without -i: %q", r.stdout)
	}

	// 64 MiB through stdout, checked against the guest's own sha256.
	r = h.run("", "run", img, "sh", "-c",
		"head -c 67108864 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob")
	sum := sha256.Sum256([]byte(r.stdout))
	guest, _, _ := strings.Cut(r.stderr, " ")
	if r.code != 0 || len(r.stdout) != 64<<20 || hex.EncodeToString(sum[:]) != guest {
		t.Errorf("64 MiB: code %d, %d bytes, sha256 %x, guest says %q", r.code, len(r.stdout), sum, r.stderr)
	}
	t.Logf("64 MiB through stdout in %s", r.took)

	// 16 MiB through stdin (flow-controlled by the stdin window), checked
	// by the guest's sha256.
	in := make([]byte, 16<<20)
	for i := range in {
		in[i] = byte(i*7 + i>>13)
	}
	inSum := sha256.Sum256(in)
	r = h.run(string(in), "run", "-i", img, "sha256sum")
	if got, _, _ := strings.Cut(r.stdout, " "); r.code != 0 || got != hex.EncodeToString(inSum[:]) {
		t.Errorf("16 MiB through stdin: code %d, guest sha256 %q, want %x (stderr %q)", r.code, r.stdout, inSum, r.stderr)
	}
}

func TestImageConfig(t *testing.T) {
	h := newHarness(t)
	reg := testenv.StartRegistry(t)
	img := reg.Push(t, testenv.BusyboxImage(t, v1.Config{
		Env:        []string{"FOO=from-image", "BAR=kept"},
		WorkingDir: "/work",
		User:       "app",
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{"echo default $FOO"},
	}), "config:1")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"entrypoint and cmd", []string{img}, "default from-image\n"},
		{"command replaces cmd", []string{img, "echo $FOO $BAR; pwd; id -u; id -G; echo $HOME"}, "from-image kept\n/work\n1000\n1000 50\n/home/app\n"},
		{"flags override", []string{"-e", "FOO=flag", "-w", "/tmp", "-u", "0", img, "echo $FOO $BAR; pwd; id -u"}, "flag kept\n/tmp\n0\n"},
		{"uid:gid", []string{"-u", "4242:77", img, "id -u; id -g; echo $HOME"}, "4242\n77\n/\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := h.run("", append([]string{"run"}, tc.args...)...)
			if r.code != 0 || r.stdout != tc.want {
				t.Errorf("stdout %q (code %d, stderr %q), want %q", r.stdout, r.code, r.stderr, tc.want)
			}
		})
	}
	r := h.run("", "run", "-u", "nosuchuser", img, "true")
	if r.code != 125 || !strings.Contains(r.stderr, "unable to find user nosuchuser") {
		t.Errorf("unknown user: code %d stderr %q", r.code, r.stderr)
	}
}

func TestLayers(t *testing.T) {
	h := newHarness(t)
	reg := testenv.StartRegistry(t)
	lower := []imagebuild.File{
		{Path: "/data", Dir: true, Mode: 0o755},
		{Path: "/data/gone", Mode: 0o644, Body: []byte("deleted above")},
		{Path: "/data/kept", Mode: 0o644, Body: []byte("kept")},
		{Path: "/opq", Dir: true, Mode: 0o755},
		{Path: "/opq/hidden", Mode: 0o644},
	}
	upper := []imagebuild.File{
		imagebuild.Whiteout("/data/gone"),
		imagebuild.Opaque("/opq"),
		{Path: "/opq/new", Mode: 0o644},
	}
	special := []imagebuild.File{
		{Path: "/meta", Dir: true, Mode: 0o755},
		{Path: "/meta/suid", Mode: 0o4755, Body: []byte("#!/bin/sh\n")},
		{Path: "/meta/owned", Mode: 0o640, Body: []byte("x"), UID: 1000, GID: 50},
		{Path: "/meta/hard", Hardlink: "/meta/owned"},
		{Path: "/meta/link", Symlink: "owned"},
		{Path: "/meta/null", Char: &[2]int64{1, 3}, Mode: 0o666},
	}
	img := reg.Push(t, testenv.BusyboxImage(t, v1.Config{}, lower, upper, special), "layers:1")
	r := h.run("", "run", img, "sh", "-c", "ls /data; ls /opq; cat /data/kept; echo; touch /data/x && ls /data | wc -l")
	if want := "kept\nnew\nkept\n2\n"; r.stdout != want {
		t.Errorf("stdout %q (stderr %q), want %q", r.stdout, r.stderr, want)
	}
	// Owners, modes, hard links, symlinks and device nodes survive the
	// trip through erofs into the guest.
	r = h.run("", "run", img, "sh", "-c", `cd /meta && stat -c '%n %a %u:%g %h %F' suid owned hard && readlink link && stat -c '%F %t:%T' null && [ "$(stat -c %i owned)" = "$(stat -c %i hard)" ] && echo same-inode`)
	want := "suid 4755 0:0 1 regular file\nowned 640 1000:50 2 regular file\nhard 640 1000:50 2 regular file\nowned\ncharacter special file 1:3\nsame-inode\n"
	if r.stdout != want {
		t.Errorf("metadata in the guest:\n%s(stderr %q), want:\n%s", r.stdout, r.stderr, want)
	}
}

func TestConcurrentVMs(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	var wg sync.WaitGroup
	results := make([]result, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = h.run("", "run", "--name", fmt.Sprintf("vm%d", i), img, "sh", "-c", "hostname; exit "+fmt.Sprint(i))
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.code != i || r.stdout != fmt.Sprintf("vm%d\n", i) {
			t.Errorf("vm %d: code %d stdout %q stderr %q", i, r.code, r.stdout, r.stderr)
		}
	}
}

func TestCtrlC(t *testing.T) {
	h := newHarness(t)
	img := tools(t)
	for _, tc := range []struct {
		name    string
		script  string
		signals int
		code    int
		out     string
	}{
		{"trapped", `trap "echo got INT; exit 7" INT; echo ready; while true; do sleep 0.1; done`, 1, 7, "got INT"},
		{"second Ctrl-C kills", `trap "echo ignoring" INT; echo ready; while true; do sleep 0.1; done`, 2, 137, "ignoring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd, stdout := h.start(t, ctx, nil, "run", img, "sh", "-c", tc.script)
			sc := bufio.NewScanner(stdout)
			if !sc.Scan() || sc.Text() != "ready" {
				t.Fatalf("no ready line: %q", sc.Text())
			}
			for i := 0; i < tc.signals; i++ {
				_ = cmd.Process.Signal(syscall.SIGINT)
				if i+1 < tc.signals {
					if !sc.Scan() || sc.Text() != tc.out {
						t.Fatalf("after Ctrl-C %d: %q", i+1, sc.Text())
					}
				}
			}
			rest, _ := io.ReadAll(stdout)
			err := cmd.Wait()
			code := cmd.ProcessState.ExitCode()
			if code != tc.code {
				t.Errorf("exit %d (%v), want %d", code, err, tc.code)
			}
			if tc.signals == 1 && !strings.Contains(string(rest), tc.out) {
				t.Errorf("output %q lacks %q", rest, tc.out)
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	h := newHarness(t)
	reg := testenv.StartRegistry(t)
	img := reg.Push(t, testenv.BusyboxImage(t, v1.Config{}), "tools:1")
	silent := testenv.SilentServer(t)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"unparsable reference", nil, []string{"run", "Not A Ref!!", "true"}, "invalid image reference"},
		{"missing image", nil, []string{"run", reg.Addr + "/nope:1", "true"}, "image not found"},
		{"silent registry", nil, []string{"--registry-timeout", "1s", "run", silent + "/x:1", "true"}, "did not answer"},
		{"no kernel", []string{"HEARTH_KERNEL=/nonexistent/vmlinux"}, []string{"run", img, "true"}, "no guest kernel at /nonexistent/vmlinux: build it with `make kernel`"},
		{"memory too small", nil, []string{"run", "--memory", "16M", img, "true"}, "too small to boot"},
		{"bad memory", nil, []string{"run", "--memory", "lots", img, "true"}, `--memory "lots"`},
		{"bad accel", nil, []string{"run", "--accel", "xen", img, "true"}, `--accel "xen"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hh := *h
			hh.t = t
			hh.env = append(append([]string(nil), h.env...), tc.env...)
			r := hh.run("", tc.args...)
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if r.code != 125 || len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Errorf("code %d, stderr %q; want 125 and one line containing %q", r.code, r.stderr, tc.want)
			}
			if r.took > 30*time.Second {
				t.Errorf("took %s", r.took)
			}
		})
	}
}
