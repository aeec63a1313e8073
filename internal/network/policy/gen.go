package policy

// The C source and the objects compiled from it are committed, so that a
// build needs no clang (the source is in bpf/, out of the Go package, which
// would take a .c file for cgo): `go generate ./internal/network/policy` (clang, llvm
// and libbpf-dev) rebuilds them.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -tags linux -type endpoint -type config -type rule_key -type rule -type addr_key policy bpf/policy.c -- -I/usr/include/x86_64-linux-gnu
