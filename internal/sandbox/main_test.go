package sandbox

import (
	"testing"

	"hearth.dev/hearth/internal/testenv"
)

// TestMain removes the binaries testenv.Binaries built for the tests.
func TestMain(m *testing.M) { testenv.Main(m) }
