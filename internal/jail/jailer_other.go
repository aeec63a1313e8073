//go:build !linux

package jail

import (
	"fmt"
	"os"
)

// Main is hearth-jailer, which needs Linux's namespaces and cgroups.
func Main([]string) int {
	fmt.Fprintln(os.Stderr, "hearth-jailer: runs only on Linux")
	return 1
}
