package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/logfile"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
)

// Main is the shim process for the run directory dir. Its fd 3 is the run's
// lock, held until it exits.
func Main(dir string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("run", dir)
	lock := os.NewFile(3, "lock")
	defer lock.Close()
	// Held by this process alone: not by QEMU or mkfs, which would keep
	// the run looking alive after the shim is gone.
	syscall.CloseOnExec(3)
	if err := os.Chdir(dir); err != nil {
		log.Error("enter the run directory", "err", err)
		return 1
	}
	dir = "."
	st := State{Phase: Booting}
	if err := run(log, dir, &st); err != nil {
		log.Error("run failed", "err", err)
		st.Phase, st.FinishedAt = Exited, time.Now()
		if st.Reason == "" {
			st.Reason, st.Message = "StartError", ClipMessage(err.Error())
		}
		if st.ExitCode == 0 {
			st.ExitCode = 125
		}
	}
	if err := writeState(dir, st); err != nil {
		log.Error("write state", "err", err)
		return 1
	}
	return 0
}

func run(log *slog.Logger, dir string, st *State) error {
	if err := writeState(dir, *st); err != nil {
		return err
	}
	spec, err := ReadSpec(dir)
	if err != nil {
		return err
	}
	var stream *os.File
	if spec.Incoming {
		// fd 4 (StartIncoming): QEMU gets its own copy, nothing else.
		syscall.CloseOnExec(4)
		stream = os.NewFile(4, "migration stream")
		defer stream.Close()
	}
	if err := takeSecrets(dir, spec); err != nil {
		return fmt.Errorf("the run's spec: %w", err)
	}
	creds := image.Credentials{}
	for _, cfg := range spec.PullSecrets {
		if err := creds.AddDockerConfig(cfg); err != nil {
			return fmt.Errorf("an image pull secret: %w", err)
		}
	}
	out, err := logfile.Open(spec.Log, spec.LogMax)
	if err != nil {
		return fmt.Errorf("log file: %w", err)
	}
	defer out.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	source := image.SourceOptions{Insecure: spec.InsecureRegistries, Timeout: 30 * time.Second,
		Guard: spec.Tenant, Private: spec.PrivateRegistries, Refused: spec.RefusedAddrs}
	if spec.Tenant {
		source.Keychain = creds // the sandbox's pull secrets, never this host's
	} else {
		source.Keychain = authn.DefaultKeychain
	}
	images := &image.Store{Dir: spec.ImageDir, Log: log, Source: source}
	rt := sandbox.NewRuntime(spec.Host, images, vmm.Accel(spec.Accel), image.PullMissing, log)
	rt.Reserve = spec.Reserve
	// The API's requests in flight get their replies before the shim
	// exits (a guest that broke the protocol in an exec: its client
	// hears why).
	var server *api
	defer func() {
		if server != nil {
			server.close(5 * time.Second)
		}
	}()
	sio := sandbox.IO{
		Stdout: out,
		Stderr: out,
		Running: func(r *sandbox.Running) {
			var err error
			if server, err = serveAPI(ctx, log, r); err != nil {
				log.Error("serve the shim's API", "err", err)
			}
		},
	}

	if spec.Sandbox.Stdin {
		stdin, err := serveStdin(ctx, dir, spec.StdinOnce)
		if err != nil {
			return err
		}
		sio.Stdin = stdin
	}
	t0 := time.Now()
	mark := func(flag *bool) func() {
		return func() {
			*flag = true
			if err := writeState(dir, *st); err != nil {
				log.Error("write state", "err", err)
			}
		}
	}
	sio.Prepared, sio.HandedOver = mark(&st.Prepared), mark(&st.HandedOver)
	sio.Started = func() {
		st.Phase, st.StartedAt, st.BootMillis = Running, time.Now(), time.Since(t0).Milliseconds()
		if err := writeState(dir, *st); err != nil {
			log.Error("write state", "err", err)
		}
	}
	var res *sandbox.Result
	switch {
	case spec.Incoming:
		res, err = rt.RunIncoming(ctx, stream, spec.Sandbox, sio)
	case spec.Snapshot != "":
		res, err = rt.RunSnapshot(ctx, spec.Snapshot, spec.Sandbox, sio)
	default:
		res, err = rt.Run(ctx, spec.Sandbox, sio)
	}
	st.Phase, st.FinishedAt = Exited, time.Now()
	switch {
	case ctx.Err() != nil:
		st.ExitCode, st.Signal = 128+int(syscall.SIGKILL), int(syscall.SIGKILL)
		st.Reason, st.Message = "Killed", "the sandbox's VM was stopped"
		return nil
	case errors.Is(err, sandbox.ErrMigrated):
		// Not an exit: the workload runs on in the target's run.
		st.Reason, st.Message = "Migrated", err.Error()
		return nil
	case err != nil:
		st.ExitCode = 125
		st.Reason = "StartError"
		switch {
		case errors.Is(err, image.ErrNotFound), errors.Is(err, image.ErrInvalid):
			st.Reason = "ImagePullError"
		case errors.Is(err, vmm.ErrBadSnapshot):
			st.Reason = "BadSnapshot"
		case errors.Is(err, sandbox.ErrBoot):
			st.Reason = "BootError"
		case errors.Is(err, sandbox.ErrStopped):
			st.Reason = "Error"
		case errors.Is(err, sandbox.ErrGuestProtocol):
			st.Reason = "GuestProtocolError"
		case errors.Is(err, sandbox.ErrNoSpace):
			st.Reason = "InsufficientDisk"
		case spec.Incoming:
			st.Reason = "MigrationFailed"
		}
		st.Message = ClipMessage(err.Error())
		return nil
	}
	st.ExitCode, st.Signal, st.Message = res.ExitCode, res.Signal, ClipMessage(res.Error)
	if st.BootMillis == 0 {
		st.BootMillis = res.Boot.Milliseconds()
	}
	switch {
	case res.OOM:
		st.Reason = "OOMKilled"
	case res.DiskFull:
		st.Reason = "DiskFull"
	case res.Error != "":
		st.Reason = "StartError"
	case res.ExitCode == 0:
		st.Reason = "Completed"
	default:
		st.Reason = "Error"
	}
	return nil
}

// serveStdin is the workload's stdin: what anyone attached writes to the
// run's stdin.sock, one connection after another; with once, the end of
// the first connection's input is the end of the workload's stdin.
func serveStdin(ctx context.Context, dir string, once bool) (io.Reader, error) {
	ln, err := net.Listen("unix", filepath.Join(dir, stdinSock))
	if err != nil {
		return nil, fmt.Errorf("stdin socket: %w", err)
	}
	r, w := io.Pipe()
	context.AfterFunc(ctx, func() { ln.Close(); w.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.Copy(w, c)
			c.Close()
			if once {
				w.Close()
				ln.Close()
				return
			}
		}
	}()
	return r, nil
}
