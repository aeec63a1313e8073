//go:build !linux

package vmm

// KVMUsable is false off Linux.
func KVMUsable() bool { return false }

func kvmReason() string { return "KVM exists only on Linux" }
