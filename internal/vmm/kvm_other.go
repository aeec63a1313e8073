//go:build !linux

package vmm

// KVMUsable is false off Linux.
func KVMUsable() bool { return false }

// KVMReason says why KVM is not usable: it is not, off Linux.
func KVMReason() string { return "KVM exists only on Linux" }
