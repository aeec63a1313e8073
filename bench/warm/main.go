// Command warm is `hearth bench warm` for `go run ./bench/warm [-n N]`
// (as root, with $HEARTH_SHIM and $HEARTH_AGENT naming the binaries that
// make build puts in bin/).
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	os.Exit(cli.Main(append([]string{"bench", "warm"}, os.Args[1:]...), os.Stdin, os.Stdout, os.Stderr))
}
