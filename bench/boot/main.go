// Command boot is `hearth bench boot` for `go run ./bench/boot [-n N]`.
// The benchmark re-executes its own binary as `hearth run`, so this main
// serves both roles; hearth-agent is found through $HEARTH_AGENT or PATH
// (make build puts it in bin/).
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	args := os.Args[1:]
	if len(args) == 0 || args[0] != "run" {
		args = append([]string{"bench", "boot"}, args...)
	}
	os.Exit(cli.Main(args, os.Stdin, os.Stdout, os.Stderr))
}
