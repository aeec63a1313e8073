//go:build unix

package vmm

import (
	"net"
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

// StreamFileConn is a connected pair of stream sockets for a stream this
// process relays: one end as a file to hand another process (a VMM, a
// shim), the other as a pollable connection, which Close interrupts.
func StreamFileConn() (*os.File, net.Conn, error) {
	theirs, f, err := StreamPair()
	if err != nil {
		return nil, nil, err
	}
	ours, err := net.FileConn(f)
	f.Close()
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return theirs, ours, nil
}
