// Command policy is `hearth bench policy` for `go run ./bench/policy`
// (as root).
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	os.Exit(cli.Main(append([]string{"bench", "policy"}, os.Args[1:]...), os.Stdin, os.Stdout, os.Stderr))
}
