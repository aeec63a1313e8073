package vmm

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
)

// Pids lists the processes whose command line names a path under runRoot:
// the VMMs of one hearth run root (their sockets and disks live there).
func Pids(runRoot string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(runRoot+"/")) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			pids = append(pids, pid)
		}
	}
	return pids
}
