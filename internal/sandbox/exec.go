package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/vmm"
)

// Target is a running sandbox as Exec reaches it: its VM's run directory
// and the workload's Start, whose environment, user and directory an exec
// inherits, as `docker exec` does.
type Target struct {
	RunDir string         `json:"runDir"`
	Start  protocol.Start `json:"start"`
	// Image and Digest are the image it runs, which its snapshots record.
	Image  string `json:"image,omitempty"`
	Digest string `json:"digest,omitempty"`
}

// ExecSpec is one more process in a running sandbox.
type ExecSpec struct {
	Args       []string
	Env        []string // KEY=VALUE, over the workload's
	WorkingDir string
	User       string
	TTY        bool
	Stdin      bool
	Rows, Cols uint16
}

// Exec runs spec in the sandbox t over exec port port (1 to
// protocol.ExecPorts; the caller keeps concurrent execs on distinct ports)
// and returns how it ended. The sandbox is not affected by its exit.
func Exec(ctx context.Context, driver vmm.Driver, t Target, port int, spec ExecSpec, sio IO, log *slog.Logger) (*Result, error) {
	if len(spec.Args) == 0 {
		return nil, errors.New("exec: no command given")
	}
	st := t.Start
	st.Args = spec.Args
	st.Env = mergeEnv(st.Env, spec.Env)
	st.Dir = firstNonEmpty(spec.WorkingDir, st.Dir)
	st.User = firstNonEmpty(spec.User, st.User)
	st.TTY, st.Stdin, st.Rows, st.Cols = spec.TTY, spec.Stdin, spec.Rows, spec.Cols
	st.Time = 0
	res, err := onPort(ctx, driver, t.RunDir, port, st, sio, log)
	if err != nil && errors.Is(err, ErrBoot) {
		return nil, fmt.Errorf("exec: %w", err)
	}
	return res, err
}

// onPort runs one session (st, made an exec session) with the guest agent
// of the sandbox in runDir, over exec port port.
func onPort(ctx context.Context, driver vmm.Driver, runDir string, port int, st protocol.Start, sio IO, log *slog.Logger) (*Result, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st.Exec = true
	st.Image, st.Writable = protocol.Disk{}, protocol.Disk{}
	s := &session{vm: &execChannel{driver: driver, dir: runDir, port: port}, runDir: runDir, sio: sio, start: time.Now(), log: log}
	res, err := s.run(ctx, st, 30*time.Second)
	if err != nil && errors.Is(err, ErrBoot) {
		return nil, fmt.Errorf("the sandbox's agent did not answer on exec port %d: %w", port, err)
	}
	return res, err
}

// execChannel is the slice of a VM an exec session uses: its channel. The
// VM itself belongs to the process that started it (the shim).
type execChannel struct {
	driver vmm.Driver
	dir    string
	port   int
}

var _ agentVM = (*execChannel)(nil)

func (e *execChannel) Channel(ctx context.Context) (net.Conn, error) {
	return e.driver.Dial(ctx, e.dir, e.port)
}

// Wait does not know of the VM's end: the session ends when the channel
// closes, or with its context.
func (e *execChannel) Wait(ctx context.Context) error {
	<-ctx.Done()
	return ctx.Err()
}

func (e *execChannel) Logs(int) string { return "" }
