package jail

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Limits are what one VMM's cgroup may use.
type Limits struct {
	MemoryBytes int64   // memory.max (v1: memory.limit_in_bytes)
	CPUs        float64 // cpu.max as cores (v1: cpu.cfs_quota_us); 0: no limit
	Pids        int     // pids.max: tasks, QEMU's threads included
}

// controllers are the ones a VMM's cgroup limits.
var controllers = []string{"memory", "cpu", "pids"}

// hierarchy is where this host's cgroups are: the cgroup2 mount, and for
// each controller that it does not offer, the cgroup v1 mount holding it
// (a "hybrid" host such as this project's CI machines, where memory, cpu
// and pids are bound to v1 and the unified hierarchy has none of them; a
// controller bound to v1 cannot be enabled in v2 while v1 uses it).
type hierarchy struct {
	v2 string            // "" without a cgroup2 mount
	v1 map[string]string // controller -> its v1 mount, for those v2 lacks
	// inV2 are the controllers the VMM cgroups get from v2.
	inV2 []string
}

var (
	hierOnce sync.Once
	hier     hierarchy
	hierErr  error
)

// base is the directory under each hierarchy's root holding hearth's VMM
// cgroups: at the root, not under the caller's own cgroup, because cgroup
// v2 enables controllers for a child only where the parent has no
// processes of its own.
const base = "hearth"

func findHierarchy() (hierarchy, error) {
	hierOnce.Do(func() { hier, hierErr = readHierarchy() })
	return hier, hierErr
}

func readHierarchy() (hierarchy, error) {
	h := hierarchy{v1: map[string]string{}}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return h, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, tail := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(tail) < 3 || fields[3] != "/" {
			continue
		}
		switch tail[0] {
		case "cgroup2":
			if h.v2 == "" {
				h.v2 = fields[4]
			}
		case "cgroup":
			for _, opt := range strings.Split(tail[2], ",") {
				if slices.Contains(controllers, opt) {
					h.v1[opt] = fields[4]
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return h, err
	}
	if h.v2 != "" {
		b, _ := os.ReadFile(filepath.Join(h.v2, "cgroup.controllers"))
		have := strings.Fields(string(b))
		for _, c := range controllers {
			if slices.Contains(have, c) {
				h.inV2 = append(h.inV2, c)
				delete(h.v1, c)
			}
		}
		if err := h.enableV2(); err != nil {
			return h, err
		}
	}
	for _, c := range controllers {
		if !slices.Contains(h.inV2, c) && h.v1[c] == "" {
			return h, fmt.Errorf("cgroups: this host has no %s controller in cgroup v2 or v1", c)
		}
	}
	if h.v2 == "" {
		return h, errors.New("cgroups: no cgroup2 hierarchy is mounted (a VMM is ended through its cgroup.kill)")
	}
	return h, nil
}

// enableV2 makes the base cgroup and lets its children use the v2
// controllers.
func (h hierarchy) enableV2() error {
	dir := filepath.Join(h.v2, base)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cgroups: %w", err)
	}
	if len(h.inV2) == 0 {
		return nil
	}
	var plus []string
	for _, c := range h.inV2 {
		plus = append(plus, "+"+c)
	}
	for _, d := range []string{h.v2, dir} {
		if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte(strings.Join(plus, " ")), 0); err != nil {
			return fmt.Errorf("cgroups: enable %v in %s: %w", h.inV2, d, err)
		}
	}
	return nil
}

// Cgroup is one VMM's cgroup: a v2 group (whose cgroup.kill ends every
// process in it) and, on a hybrid host, a v1 group per controller that v2
// lacks.
type Cgroup struct {
	Name string
	v2   string   // the v2 directory
	dirs []string // every directory, v2 first
}

// NewCgroup creates the cgroup name with limits l. Processes join it by
// writing to each of Procs.
func NewCgroup(name string, l Limits) (*Cgroup, error) {
	h, err := findHierarchy()
	if err != nil {
		return nil, err
	}
	cg, dirOf := h.cgroup(name)
	for _, d := range cg.dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, errors.Join(fmt.Errorf("cgroup %s: %w", name, err), cg.Remove())
		}
	}
	v2 := func(c string) bool { return dirOf[c] == cg.v2 }
	set := func(c, file, v string) error {
		if err := os.WriteFile(filepath.Join(dirOf[c], file), []byte(v), 0); err != nil {
			return fmt.Errorf("cgroup %s: %s %s: %w", name, file, v, err)
		}
		return nil
	}
	var errs []error
	if l.MemoryBytes > 0 {
		if v2("memory") {
			errs = append(errs, set("memory", "memory.max", strconv.FormatInt(l.MemoryBytes, 10)),
				// No swap: a VMM over its limit is killed, not slowed.
				set("memory", "memory.swap.max", "0"))
		} else {
			errs = append(errs, set("memory", "memory.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10)))
		}
	}
	if l.CPUs > 0 {
		const period = 100000
		quota := strconv.Itoa(int(l.CPUs * period))
		if v2("cpu") {
			errs = append(errs, set("cpu", "cpu.max", quota+" "+strconv.Itoa(period)))
		} else {
			errs = append(errs, set("cpu", "cpu.cfs_period_us", strconv.Itoa(period)), set("cpu", "cpu.cfs_quota_us", quota))
		}
	}
	if l.Pids > 0 {
		errs = append(errs, set("pids", "pids.max", strconv.Itoa(l.Pids)))
	}
	if err := errors.Join(errs...); err != nil {
		// memory.swap.max is absent where the kernel has no swap
		// accounting; that is no reason to fail.
		if !errors.Is(err, os.ErrNotExist) {
			return nil, errors.Join(err, cg.Remove())
		}
	}
	return cg, nil
}

// Procs are the cgroup.procs files a process writes "0" into to join.
func (cg *Cgroup) Procs() []string {
	var p []string
	for _, d := range cg.dirs {
		p = append(p, filepath.Join(d, "cgroup.procs"))
	}
	return p
}

// Dir is the v2 directory (its memory.max, cpu.max, pids.max where v2 has
// the controllers).
func (cg *Cgroup) Dir() string { return cg.v2 }

// Dirs are all of its directories, v2 first.
func (cg *Cgroup) Dirs() []string { return slices.Clone(cg.dirs) }

// Kill ends every process in the cgroup (cgroup.kill: no process can fork
// past it) and waits, up to five seconds, until they are gone.
func (cg *Cgroup) Kill() error { return killDir(cg.v2) }

func killDir(dir string) error {
	err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil // already removed
	}
	if err != nil {
		// A kernel before 5.14 has no cgroup.kill: signal each process.
		for _, pid := range procs(dir) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(procs(dir)) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v outlived SIGKILL", dir, procs(dir))
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// procs lists the processes in a cgroup directory.
func procs(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Remove kills what is left in the cgroup and removes its directories.
func (cg *Cgroup) Remove() error {
	err := cg.Kill()
	for _, d := range cg.dirs {
		err = errors.Join(err, rmdir(d))
	}
	return err
}

// rmdir removes a cgroup directory; the kernel may still be tearing down
// a process that has left cgroup.procs (EBUSY for a moment).
func rmdir(dir string) error {
	var err error
	for range 100 {
		err = syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, err)
}

// cgroupNames lists the VMM cgroups of this host whose names start with
// prefix.
func cgroupNames(prefix string) ([]string, error) {
	h, err := findHierarchy()
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(h.v2, base))
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// openCgroup is the cgroup name as NewCgroup made it, without changing it.
func openCgroup(name string) (*Cgroup, error) {
	h, err := findHierarchy()
	if err != nil {
		return nil, err
	}
	cg, _ := h.cgroup(name)
	return cg, nil
}

// cgroup is where the cgroup name's directories are, and which of them
// holds each controller's files.
func (h hierarchy) cgroup(name string) (*Cgroup, map[string]string) {
	cg := &Cgroup{Name: name, v2: filepath.Join(h.v2, base, name)}
	cg.dirs = append(cg.dirs, cg.v2)
	dirOf := map[string]string{}
	for _, c := range controllers {
		if slices.Contains(h.inV2, c) {
			dirOf[c] = cg.v2
			continue
		}
		d := filepath.Join(h.v1[c], base, name)
		dirOf[c] = d
		if !slices.Contains(cg.dirs, d) {
			cg.dirs = append(cg.dirs, d)
		}
	}
	return cg, dirOf
}
