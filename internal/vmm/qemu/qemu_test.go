package qemu

import (
	"path/filepath"
	"strings"
	"testing"

	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/testenv"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/vmmtest"
)

func TestConformance(t *testing.T) { vmmtest.Run(t, &Driver{}) }

func TestArgs(t *testing.T) {
	base := vmm.Config{ID: "x", RunDir: "/run/x", Kernel: "/k", Initrd: "/i", Cmdline: "loglevel=7", VCPUs: 2, MemoryMiB: 512, Channel: "hearth.0",
		Drives: []vmm.Drive{{ID: "image", Path: "/img", ReadOnly: true, Serial: "image"}, {ID: "rw", Path: "/rw", Serial: "rw"}}}
	for _, tc := range []struct {
		accel vmm.Accel
		want  []string
	}{
		{vmm.TCG, []string{"-accel tcg,thread=multi", "-cpu max", "-smp 2", "-m 512M", "-no-reboot",
			"reboot=t rdinit=/init 8250.nr_uarts=1" + tscCmdline(vmm.TCG) + " loglevel=7",
			"-add-fd fd=3,set=1 -drive id=image,file=/dev/fdset/1,file.locking=off,format=raw,if=none,readonly=on", "virtio-blk-device,drive=image,serial=image",
			"-add-fd fd=4,set=2 -add-fd fd=5,set=2 -drive id=rw,file=/dev/fdset/2,file.locking=off,format=raw,if=none,cache=unsafe", "-qmp unix:/run/x/vm/qmp.sock,server=on,wait=off",
			"virtio-serial-device,max_ports=2", "socket,id=channel,path=/run/x/vm/agent.sock,server=on,wait=off", "virtserialport,chardev=channel,name=hearth.0",
			"-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny"}},
		{vmm.KVM, []string{"-accel kvm", "-cpu host", "8250.nr_uarts=1 loglevel=7"}},
	} {
		c := base
		c.Accel = tc.accel
		line := strings.Join(Args(c), " ")
		for _, w := range tc.want {
			if !strings.Contains(line, w) {
				t.Errorf("%s: %q lacks %q", tc.accel, line, w)
			}
		}
	}
}

func TestArgsMemoryFile(t *testing.T) {
	c := vmm.Config{ID: "x", RunDir: "/run/x", MemoryMiB: 256, MemoryFile: "/run/x/memory"}
	line := strings.Join(Args(c), " ")
	for _, w := range []string{"microvm,acpi=off,pcie=off,isa-serial=on,x-option-roms=off,memory-backend=ram",
		"-object memory-backend-file,id=ram,size=256M,mem-path=/run/x/memory,share=on"} {
		if !strings.Contains(line, w) {
			t.Errorf("%q lacks %q", line, w)
		}
	}
	// A clone maps a snapshot's memory privately: copy-on-write.
	if line := strings.Join(args(c, "/snap/memory", false, false), " "); !strings.Contains(line, "mem-path=/snap/memory,share=off") {
		t.Errorf("restore: %q maps the snapshot shared", line)
	}
	if strings.Contains(strings.Join(Args(vmm.Config{MemoryMiB: 256}), " "), "memory-backend") {
		t.Error("a memory backend without a memory file")
	}
}

// TestConformanceJailed runs the suite with every QEMU in its jail.
func TestConformanceJailed(t *testing.T) {
	testenv.NeedVMs(t)
	vmmtest.Run(t, &Driver{Jail: &jail.Options{
		Jailer: filepath.Join(testenv.Binaries(t), "hearth-jailer"), LeaseDir: t.TempDir()}})
}
