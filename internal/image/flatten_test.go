package image

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/testenv"
)

type F = imagebuild.File

func apply(t *testing.T, layers ...[]F) string {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "flattening sets owners and makes device nodes: needs root")
	root := t.TempDir()
	for i, l := range layers {
		b, err := imagebuild.Tar(l)
		if err != nil {
			t.Fatal(err)
		}
		if err := ApplyLayer(root, bytes.NewReader(b), nil); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
	}
	return root
}

func exists(root, p string) bool {
	_, err := os.Lstat(filepath.Join(root, p))
	return err == nil
}

func TestWhiteouts(t *testing.T) {
	root := apply(t,
		[]F{
			{Path: "/data", Dir: true, Mode: 0o755},
			{Path: "/data/a", Mode: 0o644, Body: []byte("a")},
			{Path: "/data/b", Mode: 0o644, Body: []byte("b")},
			{Path: "/data/sub", Dir: true, Mode: 0o755},
			{Path: "/data/sub/deep", Mode: 0o644, Body: []byte("deep")},
			{Path: "/opq", Dir: true, Mode: 0o755},
			{Path: "/opq/old1", Mode: 0o644},
			{Path: "/opq/olddir", Dir: true, Mode: 0o755},
			{Path: "/opq/olddir/x", Mode: 0o644},
		},
		[]F{
			imagebuild.Whiteout("/data/a"),
			imagebuild.Whiteout("/data/sub"),
			// A new entry before the opaque marker in the same layer
			// must survive it.
			{Path: "/opq/new-before", Mode: 0o644, Body: []byte("1")},
			imagebuild.Opaque("/opq"),
			{Path: "/opq/new-after", Mode: 0o644, Body: []byte("2")},
		},
	)
	for p, want := range map[string]bool{
		"data/a": false, "data/b": true, "data/sub": false,
		"opq/old1": false, "opq/olddir": false, "opq/new-before": true, "opq/new-after": true,
		"data/.wh.a": false, "opq/.wh..wh..opq": false,
	} {
		if got := exists(root, p); got != want {
			t.Errorf("%s exists=%v, want %v", p, got, want)
		}
	}
}

func TestReplaceAcrossTypes(t *testing.T) {
	root := apply(t,
		[]F{{Path: "/x", Dir: true, Mode: 0o755}, {Path: "/x/child", Mode: 0o644}, {Path: "/y", Mode: 0o644, Body: []byte("file")}},
		[]F{{Path: "/x", Mode: 0o600, Body: []byte("now a file")}, {Path: "/y", Symlink: "/x"}},
	)
	if b, err := os.ReadFile(filepath.Join(root, "x")); err != nil || string(b) != "now a file" {
		t.Fatalf("x: %q %v", b, err)
	}
	if target, err := os.Readlink(filepath.Join(root, "y")); err != nil || target != "/x" {
		t.Fatalf("y: %q %v", target, err)
	}
}

func TestMetadata(t *testing.T) {
	root := apply(t, []F{
		{Path: "/bin", Dir: true, Mode: 0o755},
		{Path: "/bin/suid", Mode: 0o4755, Body: []byte("#!"), UID: 0, GID: 0},
		{Path: "/home", Dir: true, Mode: 0o755},
		{Path: "/home/u", Dir: true, Mode: 0o750, UID: 1000, GID: 1001},
		{Path: "/home/u/f", Mode: 0o640, Body: []byte("data"), UID: 1000, GID: 1001, Xattrs: map[string]string{"user.hearth": "v1"}},
		{Path: "/home/u/hard", Hardlink: "/home/u/f"},
		{Path: "/home/u/link", Symlink: "f", UID: 1000, GID: 1001},
		{Path: "/dev", Dir: true, Mode: 0o755},
		{Path: "/dev/null", Char: &[2]int64{1, 3}, Mode: 0o666},
	})
	var st unix.Stat_t
	check := func(p string, mode uint32, uid, gid uint32) {
		t.Helper()
		if err := unix.Lstat(filepath.Join(root, p), &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&0o7777 != mode || st.Uid != uid || st.Gid != gid {
			t.Errorf("%s: mode %o uid %d gid %d, want %o %d %d", p, st.Mode&0o7777, st.Uid, st.Gid, mode, uid, gid)
		}
	}
	check("bin/suid", 0o4755, 0, 0)
	check("home/u", 0o750, 1000, 1001)
	check("home/u/f", 0o640, 1000, 1001)
	var a, b unix.Stat_t
	_ = unix.Stat(filepath.Join(root, "home/u/f"), &a)
	_ = unix.Stat(filepath.Join(root, "home/u/hard"), &b)
	if a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("hard link: inodes %d/%d nlink %d", a.Ino, b.Ino, a.Nlink)
	}
	if err := unix.Lstat(filepath.Join(root, "home/u/link"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFLNK || st.Uid != 1000 {
		t.Errorf("symlink: mode %o uid %d err %v", st.Mode, st.Uid, err)
	}
	if err := unix.Lstat(filepath.Join(root, "dev/null"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
		t.Errorf("device: mode %o rdev %d err %v", st.Mode, st.Rdev, err)
	}
	buf := make([]byte, 16)
	if n, err := unix.Lgetxattr(filepath.Join(root, "home/u/f"), "user.hearth", buf); err != nil || string(buf[:n]) != "v1" {
		t.Errorf("xattr: %q %v", buf[:n], err)
	}
}

// A hostile layer must not write outside the root, whether by "..", an
// absolute path or a symlink planted in an earlier layer.
func TestNoEscape(t *testing.T) {
	outside := t.TempDir()
	root := apply(t,
		[]F{{Path: "/evil", Symlink: outside}, {Path: "/rel", Symlink: "../../../../../../" + strings.TrimPrefix(outside, "/")}},
		[]F{
			{Path: "/evil/pwned", Mode: 0o644, Body: []byte("x")},
			{Path: "/rel/pwned2", Mode: 0o644, Body: []byte("x")},
			{Path: "/../../pwned3", Mode: 0o644, Body: []byte("x")},
		},
	)
	// A hard link resolves inside the root too: to a file that is not
	// there, so the layer is refused rather than linking the host's.
	b, err := imagebuild.Tar([]F{{Path: "/hl", Hardlink: "../../../../etc/hostname"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ApplyLayer(root, bytes.NewReader(b), nil); err == nil {
		t.Error("hard link to ../../../../etc/hostname was accepted")
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Fatalf("wrote outside the root: %v", entries)
	}
	if !exists(root, "pwned3") {
		t.Error("../../pwned3 should land at the root")
	}
}
