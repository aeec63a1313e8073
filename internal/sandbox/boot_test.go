package sandbox

import (
	"bytes"
	"context"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// TestSmallestGuest: a guest of MinMemoryMiB boots, runs its workload and
// execs beside it (one channel: no guest memory per session).
func TestSmallestGuest(t *testing.T) {
	testenv.NeedVMs(t)
	work := t.TempDir()
	runRoot := filepath.Join(work, "run")
	t.Cleanup(func() { testenv.CheckNoLeaks(t, runRoot) })
	rt := &Runtime{
		Images: &image.Store{Dir: filepath.Join(work, "images")}, Driver: &qemu.Driver{}, Accel: vmm.DetectAccel(),
		Kernel: config.Kernel(), Agent: filepath.Join(testenv.Binaries(t), "hearth-agent"), CacheDir: work, RunRoot: runRoot,
	}
	ref := testenv.OCILayout(t, testenv.BusyboxImage(t, v1.Config{}), "small")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	res, err := rt.Run(ctx, Spec{Image: ref, CPUs: 1, MemoryMiB: MinMemoryMiB, DiskMiB: MinDiskMiB,
		Entrypoint: []string{"sh", "-c", "sleep 1; echo done"}}, IO{Stdout: &out, Stderr: io.Discard,
		Running: func(r *Running) {
			var e bytes.Buffer
			for i := range 4 {
				if res, err := r.Exec(ctx, ExecSpec{Args: []string{"echo", "exec"}}, IO{Stdout: &e, Stderr: io.Discard}); err != nil || res.ExitCode != 0 {
					t.Errorf("exec %d into a %d MiB guest: %v %+v", i, MinMemoryMiB, err, res)
				}
			}
			if e.String() != strings.Repeat("exec\n", 4) {
				t.Errorf("the execs printed %q", e.String())
			}
		}})
	if err != nil || res.ExitCode != 0 || out.String() != "done\n" {
		t.Fatalf("a %d MiB guest: %v %+v, output %q", MinMemoryMiB, err, res, out.String())
	}
}
