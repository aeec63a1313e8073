package sandbox

import (
	"os"
	"testing"

	"hearth.dev/hearth/internal/testenv"
)

// TestMain removes the binaries testenv.Binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}
