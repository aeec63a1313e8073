package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"hearth.dev/hearth/internal/bench"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/testenv"
)

// TestMain removes the binaries testenv.Binaries built for TestSmoke.
func TestMain(m *testing.M) { testenv.Main(m) }

// Every benchmark's --smoke sizes name flags it has: a renamed flag must
// not silently leave the smoke run at full size.
func TestSmokeFlagsExist(t *testing.T) {
	for _, b := range benchmarks() {
		fs := pflag.NewFlagSet(b.name, pflag.ContinueOnError)
		b.flags(fs)
		if len(b.smoke) == 0 {
			t.Errorf("%s has no smoke sizes", b.name)
		}
		for name, v := range b.smoke {
			if fs.Lookup(name) == nil {
				t.Errorf("%s: smoke flag --%s is not one of its flags", b.name, name)
			} else if err := fs.Set(name, v); err != nil {
				t.Errorf("%s: smoke --%s=%s: %v", b.name, name, v, err)
			}
		}
	}
}

// TestSmoke runs every benchmark at its smoke size, as CI does, with real
// VMs, a real kube-apiserver, nginx and eBPF: each must finish and print a
// result whose figures are all positive, leave no VM, run directory or
// image behind, and `compare` must read the file back.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped with -short: boots VMs and runs every benchmark (a few minutes)")
	}
	testenv.NeedVMs(t)
	for _, bin := range []string{"nginx", "ip"} {
		_, err := exec.LookPath(bin)
		testenv.Need(t, err == nil, bin+" is not installed (run scripts/setup.sh)")
	}
	kube, why := bench.KubeAPIServerBinary("")
	testenv.Need(t, kube != "", "kube-apiserver: "+why)

	bins := testenv.Binaries(t)
	hb := filepath.Join(bins, "hearth-bench")
	build := exec.Command("go", "build", "-o", hb, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build hearth-bench: %v\n%s", err, out)
	}
	images := config.ImageDir()
	before, _ := os.ReadDir(images)

	runRoot := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	smoke := func(out string, only ...string) []bench.Result {
		args := []string{"all", "--smoke", "--out", out}
		if len(only) > 0 {
			args = append(args, "--only", strings.Join(only, ","))
		}
		cmd := exec.CommandContext(ctx, hb, args...)
		cmd.Env = append(os.Environ(), "HEARTH_RUN_DIR="+runRoot, "HEARTH_IMAGE_DIR=")
		var stdout bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stdout
		t0 := time.Now()
		err := cmd.Run()
		t.Logf("hearth-bench %s took %s (%v):\n%s", strings.Join(args, " "), time.Since(t0).Round(time.Second), err, stdout.String())
		results, rerr := bench.ReadResults(out)
		if rerr != nil {
			t.Fatal(rerr)
		}
		return results
	}
	out := filepath.Join(t.TempDir(), "smoke.jsonl")
	results := smoke(out)
	// A benchmark that fails is run once more, alone: on CI's loaded
	// machine an in-process control plane may fall over for reasons that
	// are not the benchmark's (the first run's log above says which). One
	// that fails twice fails the test.
	var failed []string
	for _, r := range results {
		if r.Error != "" {
			failed = append(failed, r.Bench)
		}
	}
	if len(failed) > 0 {
		t.Logf("again, after failures of %v", failed)
		again := smoke(filepath.Join(t.TempDir(), "again.jsonl"), failed...)
		for i, r := range results {
			for _, a := range again {
				if a.Bench == r.Bench {
					results[i] = a
				}
			}
		}
		f, err := os.Create(out)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range results {
			fmt.Fprintln(f, r.JSON())
		}
		f.Close()
	}

	var names []string
	for _, r := range results {
		names = append(names, r.Bench)
		if err := r.Check(); err != nil {
			t.Error(err)
		}
		if !r.Smoke {
			t.Errorf("%s: not marked smoke", r.Bench)
		}
	}
	var want []string
	for _, b := range benchmarks() {
		want = append(want, b.name)
	}
	if !slices.Equal(names, want) {
		t.Errorf("results for %v, want %v", names, want)
	}
	for _, r := range results {
		if r.Bench == "api" && !strings.Contains(r.JSON(), `"baseline":"kube_apiserver_creates_per_sec"`) {
			t.Errorf("api was not measured against kube-apiserver: %s", r.JSON())
		}
	}

	testenv.CheckNoLeaks(t, runRoot)
	after, _ := os.ReadDir(images)
	if len(after) != len(before) {
		t.Errorf("the benchmarks changed the user's image store %s: %d entries before, %d after", images, len(before), len(after))
	}

	cmp, err := exec.Command(hb, "compare", out, out).CombinedOutput()
	if err != nil {
		t.Fatalf("compare: %v\n%s", err, cmp)
	}
	for _, name := range want {
		if !bytes.Contains(cmp, []byte(name)) {
			t.Errorf("compare does not list %s:\n%s", name, cmp)
		}
	}
	if bytes.Contains(cmp, []byte("worse")) || bytes.Contains(cmp, []byte("better")) {
		t.Errorf("a run compared with itself changed:\n%s", cmp)
	}
}
