// Package config finds hearth's files on this host: the cache (guest kernel,
// initramfs, converted images), the run directories of live VMs, and the
// guest agent binary. Each can be set by an environment variable.
package config

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

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
func Agent() (string, error) {
	if a := os.Getenv("HEARTH_AGENT"); a != "" {
		return a, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "hearth-agent")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("hearth-agent"); err == nil {
		return p, nil
	}
	return "", errors.New("hearth-agent not found beside hearth, on PATH or in $HEARTH_AGENT: build it with `make build`")
}
