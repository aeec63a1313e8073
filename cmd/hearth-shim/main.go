// Command hearth-shim supervises one run of one sandbox for the node agent
// (internal/shim): hearth-shim RUN-DIR, with the run's lock as fd 3. It is
// its own small binary, without the control plane's libraries, so that it
// starts in milliseconds and its memory stays small for as long as its VM
// runs.
package main

import (
	"fmt"
	"os"

	"hearth.dev/hearth/internal/shim"
)

func main() {
	if len(os.Args) != 2 || os.Args[1] == "-h" || os.Args[1] == "--help" {
		fmt.Fprintln(os.Stderr, "usage: hearth-shim RUN-DIR (started by hearth's node agent, with the run's lock as fd 3)")
		os.Exit(2)
	}
	os.Exit(shim.Main(os.Args[1]))
}
