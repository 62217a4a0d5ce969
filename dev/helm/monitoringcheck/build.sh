#!/usr/bin/env bash
# Builds monitoringcheck (strict decoding of ServiceMonitor / PodMonitor / PrometheusRule with
# prometheus-operator's Go types, pinned in go.mod) into $PTM_CACHE/monitoringcheck-<hash>/,
# once per version of its sources; prints the binary's path. Renamed into place last.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
hash="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)"
dir="${PTM_CACHE:-$HOME/.cache/ptm}/monitoringcheck-$hash"
if [ ! -x "$dir/monitoringcheck" ]; then
  mkdir -p "$dir"
  echo "building monitoringcheck -> $dir" >&2
  (cd "$here" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$dir/monitoringcheck.tmp" .)
  mv "$dir/monitoringcheck.tmp" "$dir/monitoringcheck"
fi
echo "$dir/monitoringcheck"
