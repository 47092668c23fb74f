# What the benchmarks share; sourced by them from the repository root.

# bench_tools COMMAND:PACKAGE...: installs (apt) the package of each
# missing command.
bench_tools() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# bench_workdir NAME: makes and enters a scratch directory (WORK); on exit
# the processes in PIDS are stopped and the directory removed.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
  cd "$WORK"
}

# bench_answers URL WHAT LOG...: waits until URL answers a `Host: bench`
# request, for up to a minute (a WRAP such as valgrind slows a start);
# otherwise says WHAT does not answer, shows the LOGs and exits.
bench_answers() {
  local url=$1 what=$2
  shift 2
  for _ in $(seq 1 600); do
    curl -sf -H "Host: bench" "$url" >/dev/null && return 0
    sleep 0.1
  done
  echo "$what does not answer" >&2
  cat "$@" >&2
  exit 1
}
