#!/usr/bin/env bash
# Builds helm from its official Go module into $PTM_CACHE/helm-<version>/bin/helm, once.
# Usage: dev/helm/build.sh            (prints the binary's path on stdout)
# The version is pinned in dev/helm/helm.version. A binary already there is not rebuilt, so a
# second run builds nothing; the build lands in a temporary folder and is renamed last, so an
# interrupted build leaves no binary behind.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(tr -d '[:space:]' < "$here/helm.version")"
[ -n "$version" ] || { echo "no version in $here/helm.version" >&2; exit 1; }
major="${version#v}"; major="${major%%.*}"
case "$major" in
  3) module=helm.sh/helm/v3 ;;
  *) module="helm.sh/helm/v$major" ;;
esac
cache="${PTM_CACHE:-$HOME/.cache/ptm}"
bin="$cache/helm-$version/bin"
if [ ! -x "$bin/helm" ]; then
  mkdir -p "$bin"
  tmp="$(mktemp -d "$bin/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "building helm $version ($module/cmd/helm) -> $bin" >&2
  # helm stamps its version through internal/version; -trimpath keeps the build reproducible.
  ldflags="-s -w -X $module/internal/version.version=$version -X $module/internal/version.gitTreeState=clean"
  CGO_ENABLED=0 GOFLAGS=-mod=mod GOBIN="$tmp" \
    go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$version"
  mv "$tmp/helm" "$bin/helm"   # rename last
fi
echo "$bin/helm"
