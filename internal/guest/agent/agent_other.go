//go:build !linux

package agent

import (
	"fmt"
	"os"
)

// Main exits: hearth-agent runs only inside a Linux guest.
func Main(string) {
	fmt.Fprintln(os.Stderr, "hearth-agent: runs only as PID 1 inside a Linux guest")
	os.Exit(2)
}
