//go:build unix

package vmm

import (
	"os"
	"syscall"
)

// StreamPair is a connected pair of stream sockets, a migration's two
// ends: MigrateOut sends on send, Incoming reads recv.
func StreamPair() (send, recv *os.File, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(fds[0]), "send"), os.NewFile(uintptr(fds[1]), "recv"), nil
}
