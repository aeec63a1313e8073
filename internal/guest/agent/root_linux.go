package agent

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/guest/protocol"
)

// setupRoot mounts the image read-only under an overlay whose upper layer is
// the sandbox's writable disk, moves /dev, /proc and /sys into it and makes
// it the root (switch_root style: the initramfs cannot be pivot_root'ed).
func setupRoot(st *protocol.Boot) error {
	img, err := findDisk(st.Image.Serial, 5*time.Second)
	if err != nil {
		return err
	}
	rw, err := findDisk(st.Writable.Serial, 5*time.Second)
	if err != nil {
		return err
	}
	for _, d := range []string{"/mnt/image", "/mnt/rw", "/mnt/root"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount(img, "/mnt/image", fsType(st.Image.FSType, "erofs"), unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("mount image %s: %w", img, err)
	}
	// noinit_itable: hearth formats the disk with lazy inode tables on a
	// sparse file, which reads back zeros; zeroing them again in the guest
	// would only burn (emulated) CPU.
	rwType, rwData := fsType(st.Writable.FSType, "ext4"), ""
	if rwType == "ext4" {
		rwData = "noinit_itable"
	}
	if err := unix.Mount(rw, "/mnt/rw", rwType, 0, rwData); err != nil {
		return fmt.Errorf("mount writable disk %s: %w", rw, err)
	}
	if rwRoot, err = os.Open("/mnt/rw"); err != nil {
		return err
	}
	for _, d := range []string{"/mnt/rw/upper", "/mnt/rw/work"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount("overlay", "/mnt/root", "overlay", 0,
		"lowerdir=/mnt/image,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"); err != nil {
		return fmt.Errorf("mount overlay: %w", err)
	}
	for _, d := range []string{"dev", "proc", "sys", "tmp"} {
		if err := os.MkdirAll("/mnt/root/"+d, 0o755); err != nil {
			return err
		}
	}
	// hearth's writable disk has it so already (MakeDisk): a needless
	// chmod is the guest's first ext4 metadata write, which under TCG
	// costs milliseconds of first-run code.
	if fi, err := os.Stat("/mnt/root/tmp"); err != nil || fi.Mode()&(os.ModePerm|os.ModeSticky) != 0o777|os.ModeSticky {
		_ = os.Chmod("/mnt/root/tmp", 0o1777|os.ModeSticky)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		if err := unix.Mount(d, "/mnt/root"+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
	}
	if err := os.Chdir("/mnt/root"); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if err := mountDev(); err != nil {
		return err
	}
	if st.Hostname != "" {
		_ = unix.Sethostname([]byte(st.Hostname))
	}
	return nil
}

// mountDev adds what a container runtime puts in /dev beyond devtmpfs.
func mountDev() error {
	for _, m := range []struct{ src, dst, fstype, data string }{
		{"devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"shm", "/dev/shm", "tmpfs", "mode=1777"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, m.data); err != nil {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	_ = os.Remove("/dev/ptmx")
	for link, target := range map[string]string{
		"/dev/ptmx":   "pts/ptmx",
		"/dev/fd":     "/proc/self/fd",
		"/dev/stdin":  "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2",
	} {
		_ = os.Symlink(target, link)
	}
	return nil
}

func fsType(t, def string) string {
	if t == "" {
		return def
	}
	return t
}

// findDisk returns /dev/vdX for the virtio block device with this serial.
// Probing is asynchronous, so it waits a little for the device to appear.
// The devices are named in order from vda: reading their serials one after
// another until one is missing costs less than listing /sys/block.
func findDisk(serial string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		for c := 'a'; c <= 'z'; c++ {
			dev := "vd" + string(c)
			b, err := os.ReadFile("/sys/block/" + dev + "/serial")
			if err != nil {
				break
			}
			if strings.TrimSpace(string(b)) == serial {
				return "/dev/" + dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk with serial %q", serial)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
