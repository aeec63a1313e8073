//go:build !hostile

package agent

import "hearth.dev/hearth/internal/guest/protocol"

// hostile is compiled in with the hostile build tag only (hostile.go):
// a real agent never breaks the protocol on purpose.
func hostile(*session, *protocol.Process) bool { return false }
