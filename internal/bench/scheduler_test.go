package bench

import "testing"

// BenchmarkPlace is the placement part of `hearth bench scheduler`, for
// profiling: go test -bench Place -cpuprofile cpu.out ./internal/bench/
func BenchmarkPlace(b *testing.B) {
	s := benchSnapshot(10000, 100000)
	b.ResetTimer()
	placeAll(s, b.N)
}
