package jail

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"hearth.dev/hearth/internal/testenv"
)

// TestMain doubles as the owner process of TestOwnerDies: with
// $JAIL_TEST_OWNER set it starts a jailed sleep, prints its pid and waits
// to be killed.
func TestMain(m *testing.M) {
	if spec := os.Getenv("JAIL_TEST_OWNER"); spec != "" {
		os.Exit(owner(spec))
	}
	testenv.Main(m)
}

func owner(arg string) int {
	parts := strings.SplitN(arg, "|", 3)
	jailer, leases, runDir := parts[0], parts[1], parts[2]
	o := &Options{Jailer: jailer, LeaseDir: leases}
	j, err := o.Prepare(VM{ID: "owner", RunDir: runDir, Limits: Limits{Pids: 8}})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	cmd, err := j.Command(jailer, "/usr/bin/sleep", []string{"1000"})
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println(cmd.Process.Pid)
	select {}
}

func needRoot(t *testing.T) string {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "needs root (cgroups, namespaces)")
	return filepath.Join(testenv.Binaries(t), "hearth-jailer")
}

func TestLease(t *testing.T) {
	o := &Options{UIDs: Range{First: 5_000_000, Count: 2}, LeaseDir: t.TempDir()}
	a, fa, err := o.lease()
	if err != nil {
		t.Fatal(err)
	}
	b, fb, err := o.lease()
	if err != nil {
		t.Fatal(err)
	}
	if a == b || a < 5_000_000 || a > 5_000_001 || b < 5_000_000 || b > 5_000_001 {
		t.Fatalf("leases %d and %d from a range of two", a, b)
	}
	if _, _, err := o.lease(); err == nil || !strings.Contains(err.Error(), "all 2 uids from 5000000 are in use") {
		t.Fatalf("a third lease: %v", err)
	}
	fa.Close()
	c, fc, err := o.lease()
	if err != nil || c != a {
		t.Fatalf("after a release: %d, %v; want %d", c, err, a)
	}
	fb.Close()
	fc.Close()
}

func TestParseRange(t *testing.T) {
	if r, err := ParseRange("200000-200009"); err != nil || r != (Range{First: 200000, Count: 10}) {
		t.Errorf("got %v, %v", r, err)
	}
	for _, bad := range []string{"", "5", "0-10", "10-5", "a-b", "-1-5", "1-4294967296"} {
		if _, err := ParseRange(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// TestSweep starts a jailed process under a run root with no owner and
// checks that Sweep finds it, kills it and removes its cgroup, and leaves
// alone what is owned.
func TestSweep(t *testing.T) {
	jailer := needRoot(t)
	runRoot := t.TempDir()
	runDir := filepath.Join(runRoot, "orphan")
	if err := os.Mkdir(runDir, 0o700); err != nil {
		t.Fatal(err)
	}
	o := &Options{Jailer: jailer, LeaseDir: t.TempDir()}
	j, err := o.Prepare(VM{ID: "orphan", RunDir: runDir, Limits: Limits{MemoryBytes: 64 << 20, Pids: 8}})
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := j.Command(jailer, "/usr/bin/sleep", []string{"1000"})
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = j.Close() })
	waitFor(t, func() bool { return len(procs(j.Cgroup().Dir())) == 1 }, "the sleep to join its cgroup")

	if found, err := Sweep(runRoot, func(string) bool { return true }); err != nil || len(found) != 0 {
		t.Fatalf("sweep of an owned VMM: %v, %v", found, err)
	}
	if found, err := Sweep(t.TempDir(), func(string) bool { return false }); err != nil || len(found) != 0 {
		t.Fatalf("sweep of another run root: %v, %v", found, err)
	}
	found, err := Sweep(runRoot, func(string) bool { return false })
	if err != nil || len(found) != 1 || found[0] != runDir {
		t.Fatalf("sweep: %v, %v; want [%s]", found, err, runDir)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the orphan outlived the sweep")
	}
	for _, d := range j.Cgroup().Dirs() {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s outlived the sweep", d)
		}
	}
}

// TestOwnerDies SIGKILLs the process that started a jailed process: the
// parent-death signal, set again after the jailer changed uid, ends the
// jailed process within a second.
func TestOwnerDies(t *testing.T) {
	jailer := needRoot(t)
	runDir := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(runDir, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "JAIL_TEST_OWNER="+jailer+"|"+t.TempDir()+"|"+runDir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	pid, perr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || perr != nil {
		t.Fatalf("owner: %q, %v", line, err)
	}
	cg, err := openCgroup(cgroupName(runDir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })
	waitFor(t, func() bool {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		return len(procs(cg.Dir())) == 1 && strings.TrimSpace(string(comm)) == "sleep"
	}, "the jailer to become the sleep in its cgroup")
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for running(pid) {
		if time.Since(start) > time.Second {
			t.Fatalf("the jailed process %d outlived its owner by a second", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// running reports whether pid is a process that has not exited (a
// zombie has).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

func waitFor(t *testing.T, ok func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
