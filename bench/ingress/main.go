// Command ingress is `hearth bench ingress` for `go run ./bench/ingress`
// (as root, with nginx installed).
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

func main() {
	args := os.Args[1:]
	// The benchmark runs its proxy as this executable again
	// ("bench ingress-proxy ...").
	if len(args) == 0 || args[0] != "bench" {
		args = append([]string{"bench", "ingress"}, args...)
	}
	os.Exit(cli.Main(args, os.Stdin, os.Stdout, os.Stderr))
}
