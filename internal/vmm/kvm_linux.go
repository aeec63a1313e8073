package vmm

import (
	"bytes"
	"os"

	"golang.org/x/sys/unix"
)

const kvmCreateVM = 0xAE01 // _IO(KVMIO, 0x01)

// KVMUsable reports whether the CPU advertises vmx or svm and /dev/kvm can
// create a VM. Both are needed: a nested, paravirtual /dev/kvm without the
// CPU flags exists on some hosts and emulates guests instruction by
// instruction, far slower than TCG.
func KVMUsable() bool { return KVMReason() == "" }

// KVMReason says why KVM is not usable here, or "" if it is.
func KVMReason() string {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "cannot read /proc/cpuinfo"
	}
	if !bytes.Contains(info, []byte(" vmx")) && !bytes.Contains(info, []byte(" svm")) {
		return "the CPU has no vmx or svm flag"
	}
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "cannot open /dev/kvm: " + err.Error()
	}
	defer unix.Close(fd)
	vm, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
	if errno != 0 {
		return "KVM_CREATE_VM failed: " + errno.Error()
	}
	unix.Close(int(vm))
	return ""
}
