#!/usr/bin/env bash
# Builds hearth's guest kernel (an uncompressed vmlinux with a PVH entry) from
# Debian's linux-source-6.1 package and kernel/hearth.config.
#
# The result is cached outside the work tree, keyed by the sha256 of its
# inputs (the config fragment, this script, the source package version):
#   ${HEARTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}/kernel/<key>/vmlinux
# and linked as .../kernel/vmlinux, where hearth looks by default.
# A second run with the same inputs does nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HEARTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}/kernel
src_tar=/usr/src/linux-source-6.1.tar.xz
jobs=${JOBS:-$(nproc)}

if [ ! -f "$src_tar" ]; then
  echo "kernel/build.sh: $src_tar is missing; install it with: apt-get install linux-source-6.1 bc flex bison libelf-dev libssl-dev" >&2
  exit 1
fi
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { cat "$here/hearth.config" "$here/build.sh"; echo "$srcver"; } | sha256sum | cut -c1-16)
out=$cache/$key

if [ -f "$out/vmlinux" ]; then
  ln -sfn "$key/vmlinux" "$cache/vmlinux"
  echo "guest kernel up to date: $out/vmlinux"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building guest kernel $key from linux-source $srcver in $work (about 4-8 minutes on 2 cores)"
echo "  [1/3] unpacking sources"
tar -C "$work" -xf "$src_tar"
cd "$work/linux-source-6.1"
echo "  [2/3] configuring"
make -s allnoconfig KCONFIG_ALLCONFIG="$here/hearth.config" >/dev/null
# Check that every =y/=N setting of the fragment survived Kconfig's dependency
# resolution: a silently dropped symbol is a guest that cannot boot.
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  if ! grep -qx "$line" .config; then
    echo "kernel/build.sh: $line did not survive Kconfig (got: $(grep "^${line%%=*}=" .config || echo unset))" >&2
    missing=1
  fi
done <"$here/hearth.config"
[ "$missing" = 0 ] || exit 1
echo "  [3/3] compiling vmlinux with $jobs jobs"
start=$(date +%s)
# Progress: one line per 500 compiled objects, so a long build shows it is alive.
make -j"$jobs" vmlinux 2>&1 | awk '/^  (CC|AS|LD|AR)/{n++; if (n%500==0) {printf "    %d objects\n", n; fflush()}} /error|Error/{print}'
[ "${PIPESTATUS[0]}" = 0 ] || { echo "kernel/build.sh: make failed" >&2; exit 1; }
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
ln -sfn "$key/vmlinux" "$cache/vmlinux"
echo "guest kernel built in $(( $(date +%s) - start ))s: $out/vmlinux"
