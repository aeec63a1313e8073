// Command hearth-agent is PID 1 inside every hearth guest; see
// internal/guest/agent. hearth builds it into the guest's initramfs.
package main

import "hearth.dev/hearth/internal/guest/agent"

// version is set with -ldflags "-X main.version=...".
var version = "dev"

func main() { agent.Main(version) }
