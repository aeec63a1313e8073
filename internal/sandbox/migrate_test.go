package sandbox

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// lockedBuffer is a bytes.Buffer the workload's output goroutine and the
// test share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestMigrate moves a running sandbox whose shell counts in memory and
// on its writable disk into a second runtime (another host's, as far as
// the sandbox can tell): the count goes on where it was, nothing printed
// is lost or printed twice, an exec on the target sees the disk's file,
// the workload's exit comes from the target, and the source's Run ends
// with ErrMigrated. Before that, a target whose sandbox has another
// machine refuses the move, and one that takes the stream without
// confirming it gets nothing: the source runs on after both.
func TestMigrate(t *testing.T) {
	testenv.NeedVMs(t)
	bin := testenv.Binaries(t)
	work := t.TempDir()
	ref := testenv.OCILayout(t, testenv.BusyboxImage(t, v1.Config{}), "migrate")
	runtime := func(name string) *Runtime {
		runRoot := filepath.Join(work, name)
		t.Cleanup(func() { testenv.CheckNoLeaks(t, runRoot) })
		return &Runtime{
			Images: &image.Store{Dir: filepath.Join(work, name+"-images")}, Driver: &qemu.Driver{}, Accel: vmm.DetectAccel(),
			Kernel: config.Kernel(), Agent: filepath.Join(bin, "hearth-agent"), CacheDir: work, RunRoot: runRoot,
		}
	}
	src, dst := runtime("src"), runtime("dst")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	spec := Spec{Image: ref, CPUs: 1, MemoryMiB: 128, DiskMiB: 64, Name: "mover",
		Entrypoint: []string{"sh", "-c", "i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo $i; echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.05; done; exit 7"}}

	var srcOut, dstOut lockedBuffer
	var execRan atomic.Bool
	running := make(chan *Running, 1)
	ran := make(chan error, 1)
	go func() {
		_, err := src.Run(ctx, spec, IO{Stdout: &srcOut, Stderr: io.Discard, Running: func(r *Running) { running <- r }})
		ran <- err
	}()
	var origin *Running
	select {
	case origin = <-running:
	case err := <-ran:
		t.Fatalf("the sandbox ended: %v", err)
	}
	for !strings.Contains(srcOut.String(), "\n5\n") {
		time.Sleep(50 * time.Millisecond)
	}

	pair := func() (send, recv *os.File) {
		send, recv, err := vmm.StreamPair()
		if err != nil {
			t.Fatal(err)
		}
		return send, recv
	}
	incoming := func(spec Spec, recv *os.File) <-chan error {
		done := make(chan error, 1)
		var execs sync.WaitGroup
		go func() {
			defer recv.Close() // the source's stream breaks off if this side gives up
			res, err := dst.RunIncoming(ctx, recv, spec, IO{Stdout: &dstOut, Stderr: io.Discard,
				Running: func(r *Running) {
					execs.Add(1)
					go func() { // Started waits for this
						defer execs.Done()
						execRan.Store(true)
						var out bytes.Buffer
						_, err := r.Exec(ctx, ExecSpec{Args: []string{"cat", "/tmp/counter"}}, IO{Stdout: &out, Stderr: io.Discard})
						if n, _ := strconv.Atoi(strings.TrimSpace(out.String())); err != nil || n < 5 {
							t.Errorf("an exec on the target: %v, counter %q; want at least 5", err, out.String())
						}
					}()
				}})
			execs.Wait()
			if err == nil && res.ExitCode != 7 {
				err = errors.New("exit code " + strconv.Itoa(res.ExitCode) + ", want 7")
			}
			done <- err
		}()
		return done
	}

	t.Run("the target's sandbox is another machine", func(t *testing.T) {
		send, recv := pair()
		defer send.Close()
		other := spec
		other.MemoryMiB *= 2
		done := incoming(other, recv)
		if _, err := origin.MigrateOut(ctx, send, vmm.MigrateOptions{}); err == nil {
			t.Fatal("migrated to a target that refused the machine")
		}
		if err := <-done; !errors.Is(err, ErrCannotMigrate) || !strings.Contains(err.Error(), "256 MiB") {
			t.Errorf("target: %v, want ErrCannotMigrate naming its memory", err)
		}
		// The source runs on, and takes execs again.
		counter(ctx, t, origin)
	})

	t.Run("the target never confirms the load", func(t *testing.T) {
		// A target that takes the whole stream and says nothing: the
		// source, paused at the end of it, runs on.
		defer func(d time.Duration) { handoverLimit = d }(handoverLimit)
		handoverLimit = 2 * time.Second
		send, recv := pair()
		defer send.Close()
		go func() {
			defer recv.Close()
			_, _ = io.Copy(io.Discard, recv)
		}()
		before := counter(ctx, t, origin)
		_, err := origin.MigrateOut(ctx, send, vmm.MigrateOptions{})
		if err == nil || !strings.Contains(err.Error(), "did not confirm") {
			t.Fatalf("migrate to a silent target: %v, want it refused for want of the target's word", err)
		}
		time.Sleep(300 * time.Millisecond)
		if after := counter(ctx, t, origin); after <= before {
			t.Errorf("the source stopped counting: %d before, %d after", before, after)
		}
	})

	send, recv := pair()
	defer send.Close()
	done := incoming(spec, recv)
	stats, err := origin.MigrateOut(ctx, send, vmm.MigrateOptions{})
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	t.Logf("migrated: %s, downtime %s, %d MiB, %d rounds", stats.Total, stats.Downtime, stats.Bytes>>20, stats.Rounds)
	if err := <-ran; !errors.Is(err, ErrMigrated) {
		t.Errorf("the source's Run: %v, want ErrMigrated", err)
	}
	if _, err := origin.Exec(ctx, ExecSpec{Args: []string{"true"}}, IO{}); !errors.Is(err, ErrMigrated) {
		t.Errorf("an exec on the source after the move: %v, want ErrMigrated", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the target: %v", err)
	}
	if !execRan.Load() {
		t.Error("the target's sandbox never ran (no Running)")
	}
	// Every number once, in order: the source's lines, then the target's.
	lines := strings.Fields(srcOut.String() + dstOut.String())
	for i, l := range lines {
		if l != strconv.Itoa(i+1) {
			t.Fatalf("line %d is %q, want %d: source printed %q, target %q", i+1, l, i+1, srcOut.String(), dstOut.String())
		}
	}
	if len(lines) != 100 || dstOut.String() == "" {
		t.Errorf("%d lines, %q of them on the target; want 100, some there", len(lines), dstOut.String())
	}
}
