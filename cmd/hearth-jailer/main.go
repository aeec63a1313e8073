// Command hearth-jailer confines one VMM process (internal/jail): hearth's
// VMM driver starts it in new namespaces with the jail's spec, and it
// joins the VM's cgroup, builds the jail's root, drops to the VM's own uid
// and executes the VMM. It is static and small, and does nothing else.
package main

import (
	"os"

	"hearth.dev/hearth/internal/jail"
)

func main() { os.Exit(jail.Main(os.Args[1:])) }
