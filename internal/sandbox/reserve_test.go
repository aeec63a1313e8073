package sandbox

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestReserve: a reserved disk and memory file hold all their blocks
// from the start, DiskUsage counts the disks, and one that does not fit
// fails with ErrNoSpace, naming what it needed.
func TestReserve(t *testing.T) {
	root := t.TempDir()
	run := filepath.Join(root, "vm1")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	disk, mem := filepath.Join(run, snapshotDisk), filepath.Join(run, "memory")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 64<<20); err != nil {
		t.Fatal(err)
	}
	if n := allocated(t, disk); n != 0 {
		t.Fatalf("a new sparse disk holds %d bytes", n)
	}
	if err := (&Runtime{}).reserve(disk, mem, 8); err != nil || allocated(t, disk) != 0 {
		t.Fatalf("without Reserve: %v, %d bytes", err, allocated(t, disk))
	}
	rt := &Runtime{Reserve: true}
	if err := rt.reserve(disk, mem, 8); err != nil {
		t.Fatal(err)
	}
	if n := allocated(t, disk); n < 64<<20 {
		t.Errorf("reserved disk holds %d bytes, want 64 MiB", n)
	}
	if fi, err := os.Stat(disk); err != nil || fi.Size() != 64<<20 {
		t.Errorf("reserving changed the disk's size: %v %v", fi.Size(), err)
	}
	if n := allocated(t, mem); n < 8<<20 {
		t.Errorf("reserved memory file holds %d bytes, want 8 MiB", n)
	}
	if got := DiskUsage(root); got != 72<<20 {
		t.Errorf("DiskUsage = %d, want 72 MiB (the disk and the memory file)", got)
	}

	if os.Geteuid() != 0 {
		t.Skip("a full filesystem needs a tmpfs mount: root only")
	}
	small := t.TempDir()
	if err := unix.Mount("tmpfs", small, "tmpfs", 0, "size=16m"); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(small, unix.MNT_DETACH)
	big := filepath.Join(small, "vm", snapshotDisk)
	if err := os.MkdirAll(filepath.Dir(big), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(big, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(big, 64<<20); err != nil {
		t.Fatal(err)
	}
	err := rt.reserve(big, "", 0)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "needs 64 MiB") {
		t.Errorf("reserving 64 MiB on a 16 MiB filesystem: %v", err)
	}
}
