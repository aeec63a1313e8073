package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Main is hearth-jailer: SPEC-JSON -- PATH ARGS... It runs as root in the
// namespaces Jail.Command made, sets up the jail Spec describes and
// executes PATH as the jail's uid. Any failure ends it before PATH runs.
func Main(argv []string) int {
	if len(argv) < 3 || argv[1] != "--" {
		fmt.Fprintln(os.Stderr, "usage: hearth-jailer SPEC-JSON -- PATH [ARG...] (started by hearth's VMM driver; see internal/jail)")
		return 2
	}
	var spec Spec
	if err := json.Unmarshal([]byte(argv[0]), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "hearth-jailer: spec:", err)
		return 2
	}
	if err := enter(spec); err != nil {
		fmt.Fprintln(os.Stderr, "hearth-jailer:", err)
		return 1
	}
	path, args := argv[2], argv[2:]
	err := syscall.Exec(path, args, []string{})
	fmt.Fprintf(os.Stderr, "hearth-jailer: exec %s: %v\n", path, err)
	return 1
}

// enter makes the jail and drops to its uid.
func enter(s Spec) error {
	if s.UID <= 0 || s.GID <= 0 {
		return fmt.Errorf("uid %d, gid %d: a jail never runs as root", s.UID, s.GID)
	}
	// The cgroup first: from here on, cgroup.kill ends this process and
	// whatever it becomes.
	for _, p := range s.Cgroups {
		if err := os.WriteFile(p, []byte("0"), 0); err != nil {
			return fmt.Errorf("join cgroup: %w", err)
		}
	}
	if err := makeRoot(s); err != nil {
		return err
	}
	for _, l := range []struct {
		res int
		max uint64
	}{{unix.RLIMIT_NOFILE, s.NoFile}, {unix.RLIMIT_CORE, 0}, {unix.RLIMIT_FSIZE, s.FileSize}} {
		if l.res == unix.RLIMIT_FSIZE && l.max == 0 {
			continue
		}
		if err := unix.Setrlimit(l.res, &unix.Rlimit{Cur: l.max, Max: l.max}); err != nil {
			return fmt.Errorf("setrlimit: %w", err)
		}
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(s.GID, s.GID, s.GID); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(s.UID, s.UID, s.UID); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	// The change of uid cleared the parent-death signal that the driver
	// set; set it again. (In its own pid namespace the jailer's parent is
	// outside, so getppid cannot tell whether the parent died meanwhile:
	// the owner's cgroup sweep covers that moment.)
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("parent-death signal: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return nil
}

// systemPaths are the host's, read-only in every jail: the VMM and its
// shared libraries and data (/usr; on a merged-/usr host /lib and /lib64
// are links into it, recreated as links), and the dynamic linker's cache,
// without which it does not look in /usr/lib/x86_64-linux-gnu.
var systemPaths = []string{"/usr", "/lib", "/lib64", "/etc/ld.so.cache"}

// makeRoot builds the jail's root on a tmpfs at s.Root and moves into it.
// Everything is mounted in this process's own mount namespace, which dies
// with it: nothing stays mounted on the host.
func makeRoot(s Spec) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	root := s.Root
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID, "mode=755,size=64k,nr_inodes=1024"); err != nil {
		return fmt.Errorf("jail root: %w", err)
	}
	for _, p := range systemPaths {
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(target, filepath.Join(root, p)); err != nil {
				return fmt.Errorf("jail: %w", err)
			}
			continue
		}
		if err := bind(root, Bind{Path: p}); err != nil {
			return err
		}
	}
	for _, b := range s.Binds {
		if err := bind(root, b); err != nil {
			return err
		}
	}
	if err := makeDevices(root, s); err != nil {
		return err
	}
	// pivot_root(".", ".") stacks the old root under the new one; the
	// detached unmount then drops the old root, leaving the host's files
	// unreachable (runc does the same).
	if err := unix.Chdir(root); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount the host's root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	// The root itself read-only: the VMM writes only into its bind mounts.
	if err := unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID, ""); err != nil {
		return fmt.Errorf("jail root read-only: %w", err)
	}
	return nil
}

// bind mounts b.Path at the same path under root: read-only unless
// writable, never with setuid programs or device nodes; submounts are not
// carried along.
func bind(root string, b Bind) error {
	if !filepath.IsAbs(b.Path) || strings.Contains(b.Path, "/../") {
		return fmt.Errorf("bind %q: not an absolute, clean path", b.Path)
	}
	fi, err := os.Stat(b.Path)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	target := filepath.Join(root, b.Path)
	if fi.IsDir() {
		err = os.MkdirAll(target, 0o755)
	} else if err = os.MkdirAll(filepath.Dir(target), 0o755); err == nil {
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.Mount(b.Path, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", b.Path, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if !b.Writable {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		return fmt.Errorf("bind %s: remount: %w", b.Path, err)
	}
	return nil
}

// makeDevices makes /dev/null, /dev/urandom and the spec's devices in the
// jail, copies of the host's nodes; the spec's are the jail uid's alone.
func makeDevices(root string, s Spec) error {
	if err := os.Mkdir(filepath.Join(root, "dev"), 0o755); err != nil {
		return err
	}
	mk := func(dev string, mode uint32, owned bool) error {
		var st unix.Stat_t
		if err := unix.Stat(dev, &st); err != nil {
			return fmt.Errorf("device %s: %w", dev, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR {
			return fmt.Errorf("device %s: not a character device", dev)
		}
		target := filepath.Join(root, dev)
		if err := unix.Mknod(target, unix.S_IFCHR|mode, int(st.Rdev)); err != nil {
			return fmt.Errorf("device %s: %w", dev, err)
		}
		if err := unix.Chmod(target, mode); err != nil { // past the umask
			return err
		}
		if owned {
			return os.Chown(target, s.UID, s.GID)
		}
		return nil
	}
	for _, d := range []string{"/dev/null", "/dev/urandom"} {
		if err := mk(d, 0o666, false); err != nil {
			return err
		}
	}
	for _, d := range s.Devices {
		if filepath.Dir(d) != "/dev" {
			return fmt.Errorf("device %q: not in /dev", d)
		}
		if err := mk(d, 0o600, true); err != nil {
			return err
		}
	}
	return nil
}
