// Command scheduler is `hearth bench scheduler` for
// `go run ./bench/scheduler [--hosts N] ...`.
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	os.Exit(cli.Main(append([]string{"bench", "scheduler"}, os.Args[1:]...), os.Stdin, os.Stdout, os.Stderr))
}
