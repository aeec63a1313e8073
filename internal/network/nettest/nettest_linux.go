// Package nettest makes network namespaces for tests and benchmarks, and
// opens sockets inside them, so that real packets cross real devices
// without touching the machine's own network.
package nettest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// TB is what the helpers need of a test or benchmark.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Cleanup(func())
}

// Suffix is a short random string for names that must not collide with a
// concurrent run's (interface names have 15 bytes).
func Suffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Sh runs a command and fails the test with its output if it fails.
func Sh(t TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NS makes a network namespace with loopback up; it is deleted when the
// test ends.
func NS(t TB, name string) string {
	t.Helper()
	Sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	Sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// Do runs f on a thread inside namespace ns. Sockets f opens stay in ns.
func Do(ns string, f func() error) error {
	ch := make(chan error, 1)
	go func() {
		// The thread is left locked, so that the runtime discards it
		// rather than run other goroutines in the namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			ch <- fmt.Errorf("netns %s: %w", ns, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			ch <- fmt.Errorf("enter netns %s: %w", ns, err)
			return
		}
		ch <- f()
	}()
	return <-ch
}

// Listen listens on addr inside ns.
func Listen(ns, network, addr string) (l net.Listener, err error) {
	err = Do(ns, func() error { l, err = net.Listen(network, addr); return err })
	return l, err
}

// ListenPacket listens for datagrams on addr inside ns.
func ListenPacket(ns, network, addr string) (c net.PacketConn, err error) {
	err = Do(ns, func() error { c, err = net.ListenPacket(network, addr); return err })
	return c, err
}

// Dial connects from inside ns.
func Dial(ctx context.Context, ns, network, addr string) (c net.Conn, err error) {
	err = Do(ns, func() error { c, err = (&net.Dialer{}).DialContext(ctx, network, addr); return err })
	return c, err
}

// Scope is a TB for code that is not a test (the benchmarks): Fatalf
// panics with an error that Run returns, and Run undoes every Cleanup.
type Scope struct{ cleanups []func() }

type fatal struct{ err error }

func (s *Scope) Helper()                           {}
func (s *Scope) Cleanup(f func())                  { s.cleanups = append(s.cleanups, f) }
func (s *Scope) Fatalf(format string, args ...any) { panic(fatal{fmt.Errorf(format, args...)}) }

// Run calls f with a fresh Scope and cleans up after it.
func Run(f func(s *Scope) error) (err error) {
	s := &Scope{}
	defer func() {
		for i := len(s.cleanups) - 1; i >= 0; i-- {
			s.cleanups[i]()
		}
	}()
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			err = f.err
		}
	}()
	return f(s)
}
