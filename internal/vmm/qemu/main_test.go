package qemu

import (
	"os"
	"testing"

	"hearth.dev/hearth/internal/testenv"
)

// TestMain removes the binaries the conformance suite built.
func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}
