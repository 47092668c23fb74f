#!/usr/bin/env bash
# Installs the tools the tests call: dig, and ip, iptables-restore, setpriv
# and curl for the sidecar's transparent-mode tests in network namespaces.
# Fails loudly if it cannot: tests are never skipped for want of a tool.
set -euo pipefail

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in dig ip iptables-restore setpriv curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool still missing" >&2; exit 1; }
done
