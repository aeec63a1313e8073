// Command hearth runs commands in micro-VMs; see internal/cli.
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

// version is set with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	cli.Version = version
	os.Exit(cli.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
