#!/usr/bin/env bash
# Installs what hearth needs on a Debian 12 host and builds the guest kernel.
# Idempotent: installed packages are skipped and the kernel is cached by the
# hash of its inputs (kernel/build.sh), so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86          # the VMM (microvm machine; KVM or TCG)
  linux-source-6.1 bc flex bison libelf-dev libssl-dev  # the guest kernel build
  e2fsprogs erofs-utils    # mkfs.ext4 (writable disk), mkfs.erofs (images)
  busybox-static           # the demo and test images' userland
  docker-registry skopeo   # a real registry and pushes, for the tests
  xz-utils
  iproute2                 # network namespaces, veth and bridges: the multi-host tests
  nftables                 # the hosts' NAT for sandboxes (nft)
  curl                     # the ingress tests (HTTP/1.1, h2c, h2)
  nginx-light wrk          # hearth-bench ingress: nginx as the reverse proxy to measure against, wrk as the load
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root (sudo $0)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "setup: Go is not installed (https://go.dev/dl/)" >&2; exit 1; }
kernel/build.sh
