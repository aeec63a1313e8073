// Command api is `hearth bench api` for `go run ./bench/api [--n N]`.
// hearth-agent and hearth-shim are found through $HEARTH_AGENT and
// $HEARTH_SHIM or PATH (make build puts them in bin/).
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	os.Exit(cli.Main(append([]string{"bench", "api"}, os.Args[1:]...), os.Stdin, os.Stdout, os.Stderr))
}
