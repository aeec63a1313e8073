package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"k8s.io/apimachinery/pkg/types"
	apiremotecommand "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/logfile"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/shim"
)

// Exec and attach speak Kubernetes' remote command protocol (SPDY or
// WebSocket, as kubectl exec does), served by the kubelet's own library;
// the API server proxies the upgraded connection here. An exec is a
// request to the shim that owns the VM (shim.Exec, over its socket),
// which runs it as one more session on the VM's channel: the node agent
// never dials a VM, and an exec works the same after it restarted.

const streamIdle = 4 * time.Hour

// serveRemoteCommand serves exec, or attach with attach set.
func (a *Agent) serveRemoteCommand(attach bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sb, _, ok := a.sandbox(w, r)
		if !ok {
			return
		}
		opts, err := streamOptions(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		name, uid := sb.Namespace+"/"+sb.Name, string(sb.UID)
		if attach {
			remotecommand.ServeAttach(w, r, a, name, uid, "", opts, streamIdle, 30*time.Second, apiremotecommand.SupportedStreamingProtocols)
			return
		}
		remotecommand.ServeExec(w, r, a, name, uid, "", r.URL.Query()["command"], opts,
			streamIdle, 30*time.Second, apiremotecommand.SupportedStreamingProtocols)
	}
}

// currentRun is the sandbox's directory and its latest run, if it runs.
func (a *Agent) currentRun(uid string) (string, int, error) {
	dir := a.sandboxDir(types.UID(uid))
	runs, err := listRuns(dir)
	if err != nil {
		return "", 0, err
	}
	if len(runs) == 0 {
		return "", 0, errors.New("the sandbox has not started")
	}
	n := runs[len(runs)-1]
	if !shim.Alive(runDir(dir, n)) {
		return "", 0, errors.New("the sandbox is not running")
	}
	return dir, n, nil
}

// ExecInContainer runs cmd in the sandbox (remotecommand.Executor).
func (a *Agent) ExecInContainer(ctx context.Context, name string, uid string, _ string, cmd []string,
	in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	dir, n, err := a.currentRun(uid)
	if err != nil {
		return fmt.Errorf("exec in %s: %w", name, err)
	}
	sio := sandbox.IO{Stdin: in, Stdout: io.Discard, Stderr: io.Discard}
	if out != nil {
		sio.Stdout = out
	}
	if errw != nil {
		sio.Stderr = errw
	}
	resizes := make(chan protocol.Resize, 4)
	sio.Resize = resizes
	spec := sandbox.ExecSpec{Args: cmd, TTY: tty, Stdin: in != nil}
	if tty && resize != nil {
		// The first size comes before the process starts: it sets the
		// terminal's size at creation.
		select {
		case sz, ok := <-resize:
			if ok {
				spec.Cols, spec.Rows = sz.Width, sz.Height
			}
		case <-time.After(100 * time.Millisecond):
		}
		go func() {
			for sz := range resize {
				select {
				case resizes <- protocol.Resize{Rows: sz.Height, Cols: sz.Width}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	res, err := shim.Exec(ctx, runDir(dir, n), spec, sio)
	if errors.Is(err, shim.ErrNotRunning) {
		return fmt.Errorf("exec in %s: %w", name, err)
	}
	if err != nil {
		// A guest that broke the protocol here has ended its sandbox:
		// its shim ends the VM and reports GuestProtocolError.
		return err
	}
	if res.Error != "" {
		if errw != nil {
			fmt.Fprintf(errw, "hearth: %s\n", res.Error)
		}
	}
	if res.ExitCode != 0 {
		return utilexec.CodeExitError{Err: fmt.Errorf("exit status %d", res.ExitCode), Code: res.ExitCode}
	}
	return nil
}

// AttachContainer streams the workload's output from now on and, if the
// sandbox was created with stdin, sends what it reads to the workload
// (remotecommand.Attacher). It returns when the run ends or the client
// goes.
func (a *Agent) AttachContainer(ctx context.Context, name string, uid string, _ string,
	in io.Reader, out, errw io.WriteCloser, _ bool, _ <-chan remotecommand.TerminalSize) error {
	dir, n, err := a.currentRun(uid)
	if err != nil {
		return fmt.Errorf("attach to %s: %w", name, err)
	}
	run := runDir(dir, n)
	if in != nil {
		c, err := shim.DialStdin(ctx, run)
		if err != nil {
			return fmt.Errorf("attach to %s: the sandbox takes no stdin (create it with spec.stdin: true)", name)
		}
		defer c.Close()
		go func() {
			_, _ = io.Copy(c, in)
			// The end of the input: the shim closes the workload's
			// stdin (stdinOnce) or waits for the next client.
			_ = c.CloseWrite()
		}()
	}
	if out == nil {
		for shim.Alive(run) && ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	}
	return logfile.Tail(ctx, logPath(dir, n), out, func() bool { return !shim.Alive(run) })
}

// streamOptions reads the stream flags as the API takes them, in
// PodExecOptions' form (stdin=true), which the kubelet's library reads
// under other names as "1" (kube-apiserver rewrites them on the way to a
// kubelet; hearth's API server passes the query as it is).
func streamOptions(r *http.Request) (*remotecommand.Options, error) {
	q := r.URL.Query()
	for api, kubelet := range map[string]string{"stdin": remotecommand.ExecStdinParam, "stdout": remotecommand.ExecStdoutParam,
		"stderr": remotecommand.ExecStderrParam, "tty": remotecommand.ExecTTYParam} {
		if v, err := strconv.ParseBool(q.Get(api)); err == nil && v {
			q.Set(kubelet, "1")
		} else if api != kubelet {
			q.Del(kubelet)
		}
	}
	r.URL.RawQuery = q.Encode()
	r.Form = nil
	return remotecommand.NewOptions(r)
}
