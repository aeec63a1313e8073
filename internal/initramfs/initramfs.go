// Package initramfs writes the guest's initramfs: hearth-agent as /init and
// the few nodes the kernel needs before the agent runs. It is a newc cpio
// written in Go, so no external tool runs when a VM starts, and it is cached
// by the agent binary's hash: every VM on a host shares one file.
package initramfs

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cavaliergopher/cpio"
)

// File is one regular file of an initramfs.
type File struct {
	Name string // path without a leading slash
	Mode int64  // permission bits
	Body []byte
}

// Write writes an initramfs holding agent as /init to w.
func Write(w io.Writer, agent []byte) error {
	return WriteFiles(w, []File{{Name: "init", Mode: 0o755, Body: agent}})
}

// WriteFiles writes an initramfs with the directories the agent mounts on
// (/dev, /proc, /sys, /mnt) and files. No device nodes: the cpio writer
// cannot make them, so the agent takes its console from devtmpfs.
func WriteFiles(w io.Writer, files []File) error {
	cw := cpio.NewWriter(w)
	for _, d := range []string{"dev", "proc", "sys", "mnt"} {
		if err := cw.WriteHeader(&cpio.Header{Name: d, Mode: cpio.TypeDir | 0o755}); err != nil {
			return fmt.Errorf("cpio %s: %w", d, err)
		}
	}
	for _, f := range files {
		h := &cpio.Header{Name: f.Name, Mode: cpio.TypeReg | cpio.FileMode(f.Mode), Size: int64(len(f.Body))}
		if err := cw.WriteHeader(h); err != nil {
			return fmt.Errorf("cpio %s: %w", f.Name, err)
		}
		if _, err := cw.Write(f.Body); err != nil {
			return fmt.Errorf("cpio %s: %w", f.Name, err)
		}
	}
	return cw.Close()
}

// Ensure returns the path of the initramfs for the agent binary at agentPath,
// writing it under dir the first time. The cache key is the binary's path,
// size and modification time, so that a VM start does not read and hash the
// whole agent.
func Ensure(dir, agentPath string) (string, error) {
	abs, err := filepath.Abs(agentPath)
	if err != nil {
		return "", err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", fmt.Errorf("guest agent: %w", err)
	}
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%d\x00%d", abs, fi.Size(), fi.ModTime().UnixNano())))
	path := filepath.Join(dir, hex.EncodeToString(sum[:8])+".cpio")
	// Readable by all: a jailed VMM runs as a uid of its own
	// (internal/jail), and the initramfs holds nothing secret.
	if fi, err := os.Stat(path); err == nil {
		if fi.Mode().Perm()&0o004 == 0 {
			return path, os.Chmod(path, 0o644) // made by an older hearth
		}
		return path, nil
	}
	agent, err := os.ReadFile(abs)
	if err != nil {
		return "", fmt.Errorf("read guest agent: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, ".initramfs-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if err := Write(tmp, agent); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	// Rename is atomic: concurrent first runs each write a complete file.
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", err
	}
	return path, nil
}
