#!/usr/bin/env bash
# Builds the local cluster's binaries into $PTM_CACHE/k8s-<version>/bin, once.
# Usage: dev/k8s/build.sh [component ...]   (default: the control plane + kubectl + etcd)
# A component already built is skipped, so a second run builds nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")"
[ -n "$version" ] || { echo "no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }
cache="${PTM_CACHE:-$HOME/.cache/ptm}"
bin="$cache/k8s-$version/bin"
mkdir -p "$bin"
components=("$@")
if [ ${#components[@]} -eq 0 ]; then
  components=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
fi
major="${version#v}"; major="${major%%.*}"
minor="${version#v*.}"; minor="${minor%%.*}"
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$version -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$version -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
cd "$here"
for c in "${components[@]}"; do
  [ -x "$bin/$c" ] && continue
  case "$c" in
    etcd) pkg=go.etcd.io/etcd/server/v3 ;;
    kwok) pkg=sigs.k8s.io/kwok/cmd/kwok ;;
    *) pkg="k8s.io/kubernetes/cmd/$c" ;;
  esac
  echo "building $c ($pkg) -> $bin" >&2
  if [ "$c" = kwok ]; then
    # kwok is its own module with its own k8s.io requirements: install it as published.
    GOBIN="$bin.tmp" go install -trimpath -ldflags "-s -w" "$pkg@$(cat "$here/kwok.version")"
    mv "$bin.tmp/kwok" "$bin/kwok.tmp"; rmdir "$bin.tmp"
  else
    go build -trimpath -ldflags "$ldflags" -o "$bin/$c.tmp" "$pkg"
  fi
  mv "$bin/$c.tmp" "$bin/$c"   # rename last: an interrupted build leaves no binary behind
done
echo "$bin"
