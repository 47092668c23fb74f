#!/usr/bin/env bash
# Installs the tools the tests call (dig). Fails loudly if it cannot:
# tests are never skipped for want of a tool.
set -euo pipefail

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)

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
command -v dig >/dev/null || { echo "error: dig still missing" >&2; exit 1; }
