// Package testenv gives hearth's integration tests real components: the
// hearth binaries built once per test process, a Debian docker-registry on a
// free loopback port, images pushed to it with skopeo, and checks that a
// test left no VM, run directory or mount behind.
//
// Tests that need root, QEMU or the guest kernel skip with the reason on a
// machine that lacks them, except under CI (CI=true), where a missing piece
// is a failure: CI installs everything.
package testenv

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"golang.org/x/crypto/bcrypt"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/vmm"
)

// Need skips (or, under CI, fails) the test when ok is false.
func Need(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI must run this test, but %s", why)
	}
	t.Skipf("skipped: %s", why)
}

// NeedVMs checks for what booting a guest takes: root (image conversion
// sets owners and makes device nodes), QEMU, mkfs tools and the kernel.
func NeedVMs(t testing.TB) {
	t.Helper()
	Need(t, runtime.GOOS == "linux", "hearth boots VMs only on Linux")
	Need(t, os.Geteuid() == 0, "needs root (run the tests with sudo)")
	for _, bin := range []string{"qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4"} {
		_, err := exec.LookPath(bin)
		Need(t, err == nil, bin+" is not installed (run scripts/setup.sh)")
	}
	_, err := os.Stat(config.Kernel())
	Need(t, err == nil, "no guest kernel at "+config.Kernel()+" (run make kernel)")
}

// NeedRegistry checks for docker-registry and skopeo.
func NeedRegistry(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"docker-registry", "skopeo"} {
		_, err := exec.LookPath(bin)
		Need(t, err == nil, bin+" is not installed (run scripts/setup.sh)")
	}
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// RemoveBinaries removes what Binaries built; a package's TestMain calls
// it after its tests.
func RemoveBinaries() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

// Main is the TestMain of a package whose tests call Binaries: it runs the
// tests, removes the binaries and exits with the tests' status.
func Main(m *testing.M) {
	code := m.Run()
	RemoveBinaries()
	os.Exit(code)
}

// Binaries builds hearth and hearth-agent once per test process and returns
// the directory holding them.
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "hearth-bin-")
		if buildErr != nil {
			return
		}
		for _, b := range []struct{ pkg, out string }{
			{"./cmd/hearth", "hearth"},
			{"./cmd/hearthd", "hearthd"}, // hearth up runs it
			{"./cmd/hearth-agent", "hearth-agent"},
			{"./cmd/hearth-shim", "hearth-shim"},
			{"./cmd/hearth-jailer", "hearth-jailer"},
		} {
			if buildErr = GoBuild(filepath.Join(binDir, b.out), b.pkg); buildErr != nil {
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// GoBuild builds the package pkg (a path from the module root) into out,
// static and stripped, with the extra go build flags given (-tags ...).
func GoBuild(out, pkg string, flags ...string) error {
	cmd := exec.Command("go", append(append([]string{"build", "-ldflags=-s -w", "-o", out}, flags...), pkg)...)
	cmd.Dir = ModuleRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

// ModuleRoot is the repository root (where go.mod is).
func ModuleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// FreeAddr returns a free 127.0.0.1 port.
func FreeAddr(t testing.TB) string { return freeAddrOn(t, "127.0.0.1") }

var (
	portsMu sync.Mutex
	given   = map[int]bool{}
)

// freeAddrOn returns host:PORT with a port that is free now, below the
// kernel's ephemeral range: a port that bind(:0) chose would be free
// when returned, but the kernel may give it to an outgoing connection's
// source (a client of etcd, say) before whoever it is for listens on it,
// and a hearthd then failed with "address already in use". Ports handed
// out once in this process are not handed out again.
func freeAddrOn(t testing.TB, host string) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			fmt.Sscan(f[0], &low)
		}
	}
	const first = 10000
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		port := first + rand.IntN(max(low-first, 1))
		if given[port] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			continue
		}
		l.Close()
		given[port] = true
		return l.Addr().String()
	}
	t.Fatalf("no free port on %s between %d and %d", host, first, low)
	return ""
}

// Registry is a docker-registry serving on loopback for one test.
type Registry struct {
	Addr string // 127.0.0.1:PORT
	// User and Password, if set, are what the registry asks for.
	User, Password string
}

// StartRegistry starts Debian's docker-registry on 127.0.0.1 with its
// storage in a test directory; it is stopped when the test ends.
func StartRegistry(t testing.TB) *Registry { return StartRegistryOn(t, "127.0.0.1") }

// StartRegistryOn is StartRegistry on another loopback address: clients
// treat only localhost and 127.0.0.1 as plain HTTP by themselves.
func StartRegistryOn(t testing.TB, host string) *Registry {
	t.Helper()
	return startRegistry(t, host, "", "")
}

// StartAuthRegistry is StartRegistry with basic authentication: pulls and
// pushes need user and password.
func StartAuthRegistry(t testing.TB, user, password string) *Registry {
	t.Helper()
	return startRegistry(t, "127.0.0.1", user, password)
}

func startRegistry(t testing.TB, host, user, password string) *Registry {
	t.Helper()
	NeedRegistry(t)
	dir := t.TempDir()
	addr := freeAddrOn(t, host)
	auth := ""
	if user != "" {
		hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(htpasswd, []byte(user+":"+string(hash)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		auth = fmt.Sprintf("auth:\n  htpasswd:\n    realm: hearth-test\n    path: %s\n", htpasswd)
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
%s`, filepath.Join(dir, "data"), addr, auth)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command("docker-registry", "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return &Registry{Addr: addr, User: user, Password: password}
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not start on %s: %s", addr, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Push writes img to an OCI layout and copies it into the registry with
// skopeo, as repo:tag. It returns the reference to run.
func (r *Registry) Push(t testing.TB, img v1.Image, repoTag string) string {
	t.Helper()
	dir := t.TempDir()
	if err := imagebuild.WriteLayout(dir, "push", img); err != nil {
		t.Fatal(err)
	}
	ref := r.Addr + "/" + repoTag
	args := []string{"copy", "--quiet", "--dest-tls-verify=false"}
	if r.User != "" {
		args = append(args, "--dest-creds", r.User+":"+r.Password)
	}
	out, err := exec.Command("skopeo", append(args, "oci:"+dir+":push", "docker://"+ref)...).CombinedOutput()
	if err != nil {
		t.Fatalf("skopeo copy to %s: %v\n%s", ref, err, out)
	}
	return ref
}

// BusyboxImage builds the base test image with cfg and extra layers on top.
func BusyboxImage(t testing.TB, cfg v1.Config, extra ...[]imagebuild.File) v1.Image {
	t.Helper()
	base, err := imagebuild.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	img, err := imagebuild.Image(cfg, append([][]imagebuild.File{base}, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// OCILayout writes img to an OCI layout directory and returns its
// reference (oci:DIR:TAG): read from the filesystem, with no registry to
// reach (from other network namespaces too).
func OCILayout(t testing.TB, img v1.Image, tag string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag})); err != nil {
		t.Fatal(err)
	}
	return "oci:" + dir + ":" + tag
}

// CheckNoLeaks fails the test if anything under runRoot survived: a VMM
// process, a run directory or a mount.
func CheckNoLeaks(t testing.TB, runRoot string) {
	t.Helper()
	var problems []string
	if entries, _ := os.ReadDir(runRoot); len(entries) > 0 {
		for _, e := range entries {
			problems = append(problems, "run directory "+filepath.Join(runRoot, e.Name()))
		}
	}
	for _, pid := range vmm.Pids(runRoot) {
		problems = append(problems, fmt.Sprintf("VMM process %d", pid))
	}
	if mounts, err := os.ReadFile("/proc/self/mountinfo"); err == nil && bytes.Contains(mounts, []byte(runRoot)) {
		problems = append(problems, "a mount under "+runRoot)
	}
	if out, err := exec.Command("losetup", "-a").Output(); err == nil && bytes.Contains(out, []byte(runRoot)) {
		problems = append(problems, "a loop device on "+runRoot)
	}
	if len(problems) > 0 {
		t.Errorf("left behind:\n  %s", strings.Join(problems, "\n  "))
	}
}

// SilentServer listens on loopback, accepts connections and never answers:
// a registry that hangs. It returns its address.
func SilentServer(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}
