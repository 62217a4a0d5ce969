#!/usr/bin/env bash
# Installs what the local cluster's real node runs on from Debian's packages, once:
# containerd, runc and the CNI plugins (the container runtime), iptables (kube-proxy), iproute2
# (the node's address and the pods' bridge), debootstrap (the images' root filesystem).
# A no-op when everything is there; needs root (it is run by `make test` and `make demo`).
set -euo pipefail
need=()
for tool in containerd containerd-shim-runc-v2 runc ctr iptables ip debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
for plugin in bridge portmap host-local loopback; do
  [ -x "/usr/lib/cni/$plugin" ] || need+=("cni:$plugin")
done
[ ${#need[@]} -eq 0 ] && exit 0
echo "real node: installing Debian packages for: ${need[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "real node: no apt-get here; install containerd, runc, CNI plugins (bridge, portmap, host-local," >&2
  echo "loopback in /usr/lib/cni), iptables, iproute2 and debootstrap yourself" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq || true   # a stale index still installs from the snapshot mirror
$sudo apt-get install -y -qq --no-install-recommends \
  containerd runc containernetworking-plugins iptables iproute2 debootstrap >/dev/null
