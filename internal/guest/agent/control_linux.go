package agent

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"hearth.dev/hearth/internal/guest/protocol"
)

// rwRoot is the writable disk's filesystem, opened before the agent
// changes root (after which the disk's own mount is out of reach; the
// overlay above it cannot be frozen).
var rwRoot *os.File

// ioctls of linux/fs.h, which x/sys/unix does not name.
const (
	fifreeze = 0xc0045877 // _IOWR('X', 119, int)
	fithaw   = 0xc0045878 // _IOWR('X', 120, int)
)

// act carries out a control action on the running sandbox; Restored's
// part in the channel (sessions ended, output credit) is the caller's.
func act(st *protocol.Control) error {
	switch st.Action {
	case protocol.Quiesce:
		unix.Sync()
		return freeze(fifreeze)
	case protocol.Thaw:
		return thaw()
	case protocol.Restored:
		return restored(st)
	case protocol.Migrated:
		return migrated(st)
	case protocol.Probe:
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(st.Port)), time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}
	return fmt.Errorf("unknown control action %.64q", st.Action)
}

func freeze(op uint) error {
	if rwRoot == nil {
		return errors.New("the writable layer is not mounted")
	}
	return unix.IoctlSetInt(int(rwRoot.Fd()), op, 0)
}

// thaw thaws the writable layer; one that is not frozen is fine.
func thaw() error {
	if err := freeze(fithaw); err != nil && !errors.Is(err, unix.EINVAL) {
		return err
	}
	return nil
}

func restored(st *protocol.Control) error {
	if err := thaw(); err != nil {
		return err
	}
	if err := setClock(st.Time); err != nil {
		return err
	}
	if st.Hostname != "" {
		if err := unix.Sethostname([]byte(st.Hostname)); err != nil {
			return fmt.Errorf("set the hostname: %w", err)
		}
	}
	if st.Network != nil {
		if err := setupNetwork(st.Network, st.Hostname); err != nil {
			return fmt.Errorf("set up the network: %w", err)
		}
	}
	if len(st.Entropy) > 0 {
		if err := reseed(st.Entropy); err != nil {
			return fmt.Errorf("reseed the random pool: %w", err)
		}
	}
	// A machine-id the image has identifies this sandbox now; one it has
	// not (most container images) is left absent.
	if fi, err := os.Stat("/etc/machine-id"); err == nil && fi.Size() > 0 {
		id := make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return err
		}
		if err := os.WriteFile("/etc/machine-id", []byte(hex.EncodeToString(id)+"\n"), 0o444); err != nil {
			return fmt.Errorf("machine-id: %w", err)
		}
	}
	return nil
}

// migrated sets the clock and, if the new host gives one, the network
// (an address of the new host's range).
func migrated(st *protocol.Control) error {
	if err := setClock(st.Time); err != nil {
		return err
	}
	if st.Network == nil {
		return nil
	}
	name, _ := os.Hostname()
	if err := setupNetwork(st.Network, name); err != nil {
		return fmt.Errorf("set up the network: %w", err)
	}
	return nil
}

// setClock sets the clock to t (ns since the epoch; 0: leaves it).
func setClock(t int64) error {
	if t == 0 {
		return nil
	}
	tv := unix.NsecToTimeval(t)
	if err := unix.Settimeofday(&tv); err != nil {
		return fmt.Errorf("set the clock: %w", err)
	}
	return nil
}

// reseed credits the host's entropy to the kernel's input pool
// (RNDADDENTROPY: struct rand_pool_info) and makes the CRNG reseed from it
// at once (RNDRESEEDCRNG), so that getrandom and /dev/urandom diverge
// from every other clone's from the next byte on.
func reseed(entropy []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	info := make([]byte, 8+len(entropy))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(entropy)*8)) // entropy_count, in bits
	binary.NativeEndian.PutUint32(info[4:], uint32(len(entropy)))   // buf_size
	copy(info[8:], entropy)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// loopbackUp brings up the guest's lo, which workloads (and Probe) expect
// whether or not the sandbox has a network.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}
