package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
)

// TestJail boots two jailed VMs and looks at their QEMUs from outside:
// each runs as a uid of its own that cannot reach the other's files or
// process, in a root holding only what it boots from, in a network
// namespace with nothing but lo, with no_new_privs and seccomp, in a
// cgroup with the VM's limits; and its end removes the cgroup.
func TestJail(t *testing.T) {
	testenv.NeedVMs(t)
	bins := testenv.Binaries(t)
	initrd, err := initramfs.Ensure(t.TempDir(), filepath.Join(bins, "hearth-agent"))
	if err != nil {
		t.Fatal(err)
	}
	d := &Driver{Jail: &jail.Options{Jailer: filepath.Join(bins, "hearth-jailer"), LeaseDir: t.TempDir()}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type booted struct {
		vm  *VM
		dir string
	}
	var vms []booted
	for i := range 2 {
		dir := t.TempDir()
		v, err := d.Start(ctx, vmm.Config{ID: fmt.Sprint("jail", i), RunDir: dir, Kernel: config.Kernel(), Initrd: initrd,
			VCPUs: 1, MemoryMiB: 128, Accel: vmm.DetectAccel(), Channel: "hearth.0"})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Kill()
		vms = append(vms, booted{v.(*VM), dir})
	}
	a, b := vms[0], vms[1]
	uidA, uidB := procUID(t, a.vm.Pid()), procUID(t, b.vm.Pid())
	if uidA == uidB || uidA < jail.DefaultRange.First || uidB < jail.DefaultRange.First {
		t.Fatalf("QEMU uids %d and %d: want two different uids from the jail range", uidA, uidB)
	}

	// As A's uid: its own directory is there, B's is not reachable, nor
	// is B's process.
	asA := func(script string) error {
		cmd := exec.Command("sh", "-c", script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uidA), Gid: uint32(uidA)}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	// (So that the checks below can fail: what A's uid can do to A.)
	jailOf := func(v booted) string {
		return fmt.Sprintf("/proc/%d/root%s", v.vm.Pid(), filepath.Join(v.dir, jail.Dir))
	}
	for _, script := range []string{fmt.Sprintf("ls /proc/%d/root/usr/bin", a.vm.Pid()), fmt.Sprintf("kill -0 %d", a.vm.Pid())} {
		if err := asA(script); err != nil {
			t.Errorf("as VM A's uid, %q failed: %v", script, err)
		}
	}
	// Sealed once QEMU made its sockets: not even A's uid may change it.
	if uid := fileUID(t, filepath.Join(a.dir, jail.Dir)); uid != 0 {
		t.Errorf("the jail's directory is owned by %d once QEMU runs, want root", uid)
	}
	for _, script := range []string{
		"touch " + jailOf(a) + "/x",
		"ls " + jailOf(b),
		"ls " + filepath.Join(b.dir, jail.Dir),
		fmt.Sprintf("cat /proc/%d/environ", b.vm.Pid()),
		fmt.Sprintf("kill -0 %d", b.vm.Pid()),
	} {
		if err := asA(script); err == nil {
			t.Errorf("as VM A's uid, %q succeeded", script)
		}
	}

	pid := a.vm.Pid()
	root := fmt.Sprintf("/proc/%d/root", pid)
	for _, p := range []string{"/usr/bin", "/etc/ld.so.cache", "/dev/null", config.Kernel(), filepath.Join(a.dir, jail.Dir)} {
		if _, err := os.Stat(root + p); err != nil {
			t.Errorf("the jail lacks %s: %v", p, err)
		}
	}
	for _, p := range []string{"/etc/passwd", "/etc/shadow", b.dir, "/proc/1", filepath.Join(a.dir, "vm.json"), "/var", "/home", "/root/.ssh"} {
		if _, err := os.Stat(root + p); err == nil {
			t.Errorf("the jail shows %s", p)
		}
	}
	if err := os.WriteFile(root+"/usr/hearth-test", nil, 0o644); err == nil {
		os.Remove("/usr/hearth-test")
		t.Error("/usr is writable in the jail")
	}
	netdev, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/dev", pid))
	if err != nil {
		t.Fatal(err)
	}
	var ifaces []string
	for _, line := range strings.Split(string(netdev), "\n")[2:] {
		if name, _, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			ifaces = append(ifaces, name)
		}
	}
	if strings.Join(ifaces, ",") != "lo" {
		t.Errorf("the jail's network namespace has %v, want only lo", ifaces)
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, want := range []string{"NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("QEMU's status lacks %q", want)
		}
	}
	// No file it writes grows past its RAM or its largest disk.
	lim, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	for _, line := range strings.Split(string(lim), "\n") {
		if strings.HasPrefix(line, "Max file size") {
			if f := strings.Fields(line); len(f) < 5 || f[3] != strconv.Itoa(128<<20) {
				t.Errorf("QEMU's file size limit: %q, want its 128 MiB of RAM", line)
			}
		}
	}
	for _, ns := range []string{"mnt", "pid", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		if mine == its {
			t.Errorf("QEMU shares the %s namespace with the host (%s)", ns, its)
		}
	}

	cg := a.vm.jail.Cgroup()
	if got := procs(t, cg.Dir()); got != strconv.Itoa(pid) {
		t.Errorf("VM A's cgroup holds %q, want QEMU's pid %d", got, pid)
	}
	limits := map[string]string{
		"memory": strconv.Itoa((128 + vmmOverheadMiB(vmm.DetectAccel())) << 20),
		"pids":   strconv.Itoa(vmmTasks),
		"cpu":    "200000", // one vCPU and one core for QEMU's own threads
	}
	for _, d := range cg.Dirs() {
		for file, ctl := range map[string]string{"memory.max": "memory", "memory.limit_in_bytes": "memory",
			"pids.max": "pids", "cpu.max": "cpu", "cpu.cfs_quota_us": "cpu"} {
			b, err := os.ReadFile(filepath.Join(d, file))
			if err != nil {
				continue
			}
			if got := strings.Fields(string(b))[0]; got != limits[ctl] {
				t.Errorf("%s/%s = %s, want %s", d, file, got, limits[ctl])
			}
			delete(limits, ctl)
		}
	}
	if len(limits) > 0 {
		t.Errorf("no limit set for %v in %v", limits, cg.Dirs())
	}

	if err := a.vm.Kill(); err != nil {
		t.Fatal(err)
	}
	for _, d := range cg.Dirs() {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s outlived its VM", d)
		}
	}
}

func procUID(t *testing.T, pid int) int { return fileUID(t, fmt.Sprintf("/proc/%d", pid)) }

func fileUID(t *testing.T, path string) int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return int(st.Uid)
}

func procs(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestCgroupKillsOverLimit: a QEMU that grows past its memory limit is
// killed by its own cgroup (its OOM count says so), not by the host's OOM
// killer, and its end is the VM's. The limit is set below what the guest
// touches as it boots (~44 MiB of RAM beyond QEMU's own ~50 MiB).
func TestCgroupKillsOverLimit(t *testing.T) {
	testenv.NeedVMs(t)
	bins := testenv.Binaries(t)
	initrd, err := initramfs.Ensure(t.TempDir(), filepath.Join(bins, "hearth-agent"))
	if err != nil {
		t.Fatal(err)
	}
	defer func(f func(vmm.Accel) int) { vmmOverheadMiB = f }(vmmOverheadMiB)
	const ramMiB = 128
	vmmOverheadMiB = func(vmm.Accel) int { return 80 - ramMiB } // an 80 MiB limit
	d := &Driver{Jail: &jail.Options{Jailer: filepath.Join(bins, "hearth-jailer"), LeaseDir: t.TempDir()}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	v, err := d.Start(ctx, vmm.Config{ID: "oom", RunDir: t.TempDir(), Kernel: config.Kernel(), Initrd: initrd,
		VCPUs: 1, MemoryMiB: ramMiB, Accel: vmm.DetectAccel(), Channel: "hearth.0"})
	if err != nil {
		t.Fatalf("start (before the guest grew): %v", err)
	}
	vm := v.(*VM)
	defer vm.Kill()
	pid := vm.Pid()
	// The guest boots, touches its RAM, and its QEMU passes the limit.
	waitErr := vm.Wait(ctx)
	if ctx.Err() != nil {
		t.Fatalf("QEMU ran past its limit for %s", 2*time.Minute)
	}
	// The cgroup is gone with its VM: the kernel's log says who killed it.
	var memcg, global bool
	for _, rec := range kernelLog(t) {
		if strings.Contains(rec, fmt.Sprintf("Killed process %d ", pid)) {
			memcg = memcg || strings.Contains(rec, "Memory cgroup out of memory")
			global = global || !strings.Contains(rec, "Memory cgroup")
		}
	}
	t.Logf("QEMU ended: %v; killed by its memory cgroup: %v", waitErr, memcg)
	if waitErr == nil || !memcg || global {
		t.Errorf("QEMU over its limit ended with %v; killed by its memory cgroup: %v, by the host's OOM killer: %v", waitErr, memcg, global)
	}
}

// kernelLog is the kernel's log buffer, a record a line (/dev/kmsg).
func kernelLog(t *testing.T) []string {
	t.Helper()
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatalf("the kernel's log: %v", err)
	}
	defer f.Close()
	var recs []string
	buf := make([]byte, 8192)
	for {
		n, err := syscall.Read(int(f.Fd()), buf)
		if errors.Is(err, syscall.EPIPE) {
			continue // records overwritten while reading
		}
		if err != nil || n <= 0 {
			return recs
		}
		recs = append(recs, string(buf[:n]))
	}
}
