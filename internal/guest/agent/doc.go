// Package agent is hearth-agent, PID 1 of every hearth guest.
//
// It runs from the initramfs hearth writes, speaks the protocol in
// internal/guest/protocol with the host over a virtio-serial port (or vsock),
// mounts the image (read-only) under a per-sandbox writable overlay, pivots
// into it, runs the workload with the image's config applied as docker
// applies it, streams its stdio, delivers signals and window sizes, reaps
// every zombie, reports how the workload ended and powers the VM off.
package agent
