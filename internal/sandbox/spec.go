// Package sandbox runs one workload in one micro-VM: it resolves the image,
// prepares the writable disk and the initramfs, boots the VM through a
// vmm.Driver, drives the guest agent's protocol (stdio, signals, resizes,
// exit) and removes everything the VM had on the host, on every exit path.
package sandbox

import (
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/guest/protocol"
)

// Spec is what to run.
type Spec struct {
	Image string
	// Entrypoint, if not nil, replaces the image's Entrypoint and its Cmd
	// (Kubernetes' command); Command then follows it (Kubernetes' args).
	Entrypoint []string
	Command    []string // replaces the image's Cmd; nil keeps it
	Env        []string // KEY=VALUE; override the image's
	WorkingDir string   // overrides the image's
	User       string   // overrides the image's
	TTY        bool
	Stdin      bool
	Rows, Cols uint16
	CPUs       int
	MemoryMiB  int
	DiskMiB    int
	Name       string
	// Snapshottable backs guest RAM with a file in the run directory, so
	// that Snapshot can save the sandbox. (The run directory is usually on
	// tmpfs: the file takes the memory the guest touches, as RAM would.)
	Snapshottable bool
	// WarmUp runs `true` once in a sandbox started from a snapshot before
	// it is reported started, so that the first exec of whoever gets it
	// does not pay for what a fresh VM does the first time (under TCG the
	// translation of the kernel's fork and exec paths: 200-400 ms, against
	// 40-50 ms for an exec after that). For a warm pool's sandboxes.
	WarmUp bool
	// DiskFrom is a writable layer to start with (a copy of it), instead
	// of an empty one: a disk-only snapshot's (SnapshotDisk).
	DiskFrom string
	// Tap is the network interface's host side (the caller made it and
	// routes Network's address to it); without it the guest's interface
	// is connected to nothing.
	Tap     string
	Network *protocol.Network
}

// Minimums below which a guest cannot boot or run anything useful.
const (
	MinMemoryMiB = 48
	MinDiskMiB   = 8
)

// Validate checks a spec before anything is started.
func (s *Spec) Validate() error {
	if s.Image == "" {
		return fmt.Errorf("no image given")
	}
	if s.CPUs < 1 || s.CPUs > 64 {
		return fmt.Errorf("--cpus %d: want 1 to 64", s.CPUs)
	}
	if s.MemoryMiB < MinMemoryMiB {
		return fmt.Errorf("--memory %dMiB is too small to boot a guest: give it at least %d MiB", s.MemoryMiB, MinMemoryMiB)
	}
	if s.DiskMiB < MinDiskMiB {
		return fmt.Errorf("--disk %dMiB is too small: give it at least %d MiB", s.DiskMiB, MinDiskMiB)
	}
	for _, kv := range s.Env {
		if k, _, _ := strings.Cut(kv, "="); k == "" {
			return fmt.Errorf("environment variable %q has no name", kv)
		}
	}
	return nil
}

// argv applies docker's rules: the image's Entrypoint, then the given
// command if any, else the image's Cmd. A given entrypoint replaces both
// of the image's, as a Kubernetes container's command does.
func argv(cfg v1.Config, entrypoint, command []string) []string {
	if entrypoint != nil {
		return append(append([]string(nil), entrypoint...), command...)
	}
	args := append([]string(nil), cfg.Entrypoint...)
	if len(command) > 0 {
		return append(args, command...)
	}
	return append(args, cfg.Cmd...)
}

// mergeEnv returns base with each of over's variables set, replacing
// earlier values of the same name in place.
func mergeEnv(base, over []string) []string {
	out := append([]string(nil), base...)
	idx := map[string]int{}
	for i, kv := range out {
		k, _, _ := strings.Cut(kv, "=")
		idx[k] = i
	}
	for _, kv := range over {
		k, _, hasValue := strings.Cut(kv, "=")
		if !hasValue {
			continue
		}
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}
