#!/usr/bin/env bash
# Builds kube-apiserver from k8s.io/kubernetes (the Go module proxy serves
# it) for `hearth-bench api`, which measures hearth's API server against it.
# The binary is cached outside the work tree, keyed by the version:
#   ${HEARTH_CACHE:-~/.cache/hearth}/kube-apiserver/VERSION/kube-apiserver
# About 5 minutes on 2 cores the first time; prints the binary's path.
#
# k8s.io/kubernetes is not meant to be required as a module: its go.mod
# points each staging module (k8s.io/api, apimachinery, apiserver, ... 33
# of them) at ./staging, so a module that requires it must replace each
# with its published version (v0.X.Y for kubernetes v1.X.Y). The list is
# read from kubernetes' own go.mod, so it follows the version.
set -euo pipefail
version=${KUBE_APISERVER_VERSION:-v1.37.2}
cache=${HEARTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}
out=$cache/kube-apiserver/$version/kube-apiserver
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS=-mod=mod
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
[ -f "$gomod" ] || { echo "kube-apiserver: cannot download k8s.io/kubernetes@$version" >&2; exit 1; }
staging=v0.${version#v1.}
{
  echo "module hearth.dev/kube-apiserver-build"
  echo
  echo "go $(sed -n 's/^go //p' "$gomod")"
  echo
  echo "replace ("
  grep -E '=> \./staging/' "$gomod" | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > go.mod
echo "building kube-apiserver $version (about 5 minutes on 2 cores, once)" >&2
# go get lists every module it adds: keep that for a failure only.
if ! go get "k8s.io/kubernetes/cmd/kube-apiserver@$version" > get.log 2>&1; then
  cat get.log >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
mv "$out.tmp" "$out"
echo "$out"
