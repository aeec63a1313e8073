// Package config finds hearth's files on this host: the cache (guest kernel,
// initramfs, converted images), the run directories of live VMs, and the
// guest agent binary. Each can be set by an environment variable.
package config

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// DataDir is where hearthd keeps its state by default (etcd's data, the CA,
// the kubeconfig, the node agent's state): /var/lib/hearth for root, else
// ~/.local/share/hearth.
func DataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/hearth"
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "hearth")
	}
	return "hearth-data"
}

// CacheDir is $HEARTH_CACHE, else $XDG_CACHE_HOME/hearth, else ~/.cache/hearth.
// kernel/build.sh uses the same rule.
func CacheDir() string {
	if d := os.Getenv("HEARTH_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "hearth")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "hearth-cache")
	}
	return filepath.Join(home, ".cache", "hearth")
}

// ImageDir is where converted images are stored: $HEARTH_IMAGE_DIR, else
// the cache's images/. The benchmarks point it at a store of their own, so
// that they leave nothing in the user's.
func ImageDir() string {
	if d := os.Getenv("HEARTH_IMAGE_DIR"); d != "" {
		return d
	}
	return filepath.Join(CacheDir(), "images")
}

// Kernel is $HEARTH_KERNEL, else the cache's kernel/vmlinux (where
// kernel/build.sh links the newest build).
func Kernel() string {
	if k := os.Getenv("HEARTH_KERNEL"); k != "" {
		return k
	}
	return filepath.Join(CacheDir(), "kernel", "vmlinux")
}

// RunRoot is where each live VM has its run directory: $HEARTH_RUN_DIR,
// else /run/hearth as root, else $XDG_RUNTIME_DIR/hearth.
func RunRoot() string {
	if d := os.Getenv("HEARTH_RUN_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/hearth"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "hearth")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("hearth-run-%d", os.Getuid()))
}

// Agent finds the hearth-agent binary: $HEARTH_AGENT, else beside the
// running executable, else on PATH.
func Agent() (string, error) { return companion("hearth-agent", "HEARTH_AGENT") }

// Shim finds the hearth-shim binary the node agent starts for each run of
// a sandbox: $HEARTH_SHIM, else beside the running executable, else on PATH.
func Shim() (string, error) { return companion("hearth-shim", "HEARTH_SHIM") }

// Jailer finds hearth-jailer, which confines each VMM when hearth runs as
// root: $HEARTH_JAILER, else beside the running executable, else on PATH.
func Jailer() (string, error) { return companion("hearth-jailer", "HEARTH_JAILER") }

// JailDir holds the VMM uid leases: one host-wide directory, whatever the
// run root, since a uid must be one VM's on the whole host.
const JailDir = "/run/hearth-jail"

// Hearth finds the hearth CLI (the boot benchmark times `hearth run`):
// $HEARTH_BIN, else beside the running executable, else on PATH.
func Hearth() (string, error) { return companion("hearth", "HEARTH_BIN") }

// Hearthd finds hearthd, which `hearth up` runs: $HEARTH_HEARTHD, else
// beside the running executable, else on PATH.
func Hearthd() (string, error) { return companion("hearthd", "HEARTH_HEARTHD") }

// Bench finds hearth-bench, which `hearth bench` runs: $HEARTH_BENCH, else
// beside the running executable, else on PATH.
func Bench() (string, error) { return companion("hearth-bench", "HEARTH_BENCH") }

func companion(name, env string) (string, error) {
	if a := os.Getenv(env); a != "" {
		return a, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found beside hearth, on PATH or in $%s: build it with `make build`", name, env)
}
