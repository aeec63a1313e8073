// Command hearthd is hearth's daemon: the control plane (embedded etcd, the
// Kubernetes API server, the scheduler) and the node agent that runs
// sandboxes in micro-VMs, in one process or spread over machines by --roles.
package main

import (
	"os"

	"hearth.dev/hearth/internal/cli"
)

var version = "dev"

func main() {
	cli.Version = version
	os.Exit(cli.HearthdMain(os.Args[1:], os.Stdout, os.Stderr))
}
