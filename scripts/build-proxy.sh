#!/usr/bin/env bash
# Builds the release strait-proxy as its image ships it: optimised with a
# profile of its own hot paths (profile-guided optimisation). Prints the
# binary's path, $CARGO_TARGET_DIR/pgo/strait-proxy (target/pgo by default).
#
#   scripts/build-proxy.sh
#
# 1. An instrumented build (-Cprofile-generate), in target/pgo/generate.
# 2. A training run of it: the strait pair of bench/strait-pair.sh (mutual
#    TLS between two proxies) carrying HTTP/1.1 (wrk) and HTTP/2 (h2load),
#    and a third proxy forwarding opaque TCP (strait-loadgen rr), TRAIN
#    seconds each (env STRAIT_PGO_SECONDS, default 5). The proxies stop on
#    SIGTERM, which is when they write their counts.
# 3. The counts merged by llvm-profdata, of the LLVM that rustc uses.
# 4. The optimised build (-Cprofile-use), in target/pgo/use: the compiler
#    lays out branches and functions, and inlines, by what ran.
# A profile is reused while the instrumented binary is the same (same
# source, same toolchain), so a second run with nothing changed only
# checks. The profile is always of this source: a stale one would only
# warn, and optimise less.
#
# With one core per proxy pair the optimised build serves about 8 % more
# HTTP/1.1 requests per second for 8 % less CPU per request (the README's
# benchmark section). Paths the training does not run (gRPC trailers,
# TLS passthrough, the gateway's control plane) are compiled as rarely
# run: correct, and smaller rather than faster.
#
# Needs wrk, h2load (nghttp2-client), curl, and the `strait` and
# `strait-loadgen` binaries in STRAIT_PGO_TOOLS (default: a release build of
# them, as the benchmarks use; a debug build serves as well). llvm-profdata
# comes from rustup's llvm-tools component, or Debian's llvm-N for rustc's
# LLVM N; either is installed if missing, or the script fails saying so.
set -euo pipefail
shopt -s inherit_errexit
# Everything but the path this script prints goes to stderr.
exec 3>&1 1>&2
cd -- "$(dirname "$0")/.."
REPO=$PWD
SECS=${STRAIT_PGO_SECONDS:-5}
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "STRAIT_PGO_SECONDS must be a positive number, not '$SECS'" >&2; exit 2; }
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
# Absolute: the training runs in a scratch directory.
case $TARGET in /*) ;; *) TARGET=$REPO/$TARGET ;; esac
OUT=$TARGET/pgo
HOST=$(rustc -vV | awk '/^host:/ {print $2}')
LLVM=$(rustc -vV | awk '/^LLVM version:/ {split($3, v, "."); print v[1]}')
source bench/common.sh
bench_tools wrk:wrk h2load:nghttp2-client curl:curl

# llvm-profdata of rustc's LLVM major version: the raw profile's format
# changes between versions.
profdata() {
  local c
  for c in "$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata" \
    "$(command -v "llvm-profdata-$LLVM" || true)" "/usr/lib/llvm-$LLVM/bin/llvm-profdata"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}
PROFDATA=$(profdata) || {
  echo "installing llvm-profdata for LLVM $LLVM"
  rustup component add llvm-tools >/dev/null 2>&1 \
    || { command -v apt-get >/dev/null && apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "llvm-$LLVM" >/dev/null; } || true
  PROFDATA=$(profdata) || {
    echo "error: no llvm-profdata for LLVM $LLVM: run 'rustup component add llvm-tools' or install llvm-$LLVM" >&2
    exit 1
  }
}

if [ -n "${STRAIT_PGO_TOOLS:-}" ]; then
  BIN=$(cd -- "$STRAIT_PGO_TOOLS" >/dev/null && pwd)
else
  cargo build --release -q --locked -p strait-cli --bin strait -p strait-tests --bin strait-loadgen
  BIN=$TARGET/release
fi
for tool in strait strait-loadgen; do
  [ -x "$BIN/$tool" ] || { echo "error: no $tool in $BIN" >&2; exit 1; }
done

# The proxy alone (see bench/proxy-pair.sh), for the host named as the
# target, so RUSTFLAGS reach the proxy's crates and not the build scripts
# and proc-macros that run during the build. (Naming the target also
# changes every symbol's hash: proxy/symbol-order.txt is made from, and
# for, builds that name it.)
build() { # TARGET_DIR RUSTFLAG
  RUSTFLAGS="${RUSTFLAGS:-} $2" cargo build --release -q --locked -p strait-proxy --bin strait-proxy \
    --target "$HOST" --target-dir "$1"
}
RAW=$OUT/raw
PROFILE=$OUT/strait-proxy.profdata
mkdir -p "$OUT"
build "$OUT/generate" "-Cprofile-generate=$RAW"
INSTRUMENTED=$OUT/generate/$HOST/release/strait-proxy
# A profile is of this instrumented binary and this training (whichever
# build of the helpers served it: they set the pace, not the paths).
STAMP=$(cat "$INSTRUMENTED" scripts/build-proxy.sh bench/strait-pair.sh <(echo "$SECS") \
  | sha256sum | cut -d' ' -f1)

# Stops proxies (SIGTERM, when an instrumented one writes its counts) and
# fails unless each exits cleanly: one that could not start (its port
# taken) does not pass for one that served.
stop() { # PID...
  kill -TERM "$@" 2>/dev/null || true
  local p status
  for p in "$@"; do
    status=0
    wait "$p" || status=$?
    [ $status = 0 ] || { echo "error: a strait-proxy exited with status $status" >&2; cat ./*.log >&2; exit 1; }
  done
}

# The training run, in a scratch directory; every process stops with it.
train() {
  rm -rf "$RAW"
  PROXY=$INSTRUMENTED
  THREADS=1
  bench_workdir strait-pgo-train
  source "$REPO/bench/strait-pair.sh"
  local echo=127.0.0.1:25090 opaque=27240
  "$BIN/strait-loadgen" echo $echo & PIDS+=($!)
  STRAIT_LOG=warn STRAIT_THREADS=1 "$PROXY" run "${common[@]}" \
    --identity spiffe://bench.strait.local/ns/bench/sa/client \
    --outbound-listen 127.0.0.1:$opaque --inbound-listen 127.0.0.1:27243 --admin-listen 127.0.0.1:27291 \
    --inbound-target 127.0.0.1:9 --outbound-target $echo --opaque-ports ${echo##*:} >opaque.log 2>&1 & PIDS+=($!)
  local opaque_pid=$!
  curl -sf http://127.0.0.1:27191/metrics >/dev/null
  wrk -t1 -c50 -d"${SECS}s" -H "Host: bench" http://127.0.0.1:27140/ | grep Requests/sec
  h2load -c50 -m10 -t1 -D "$SECS" -H ":authority: bench" http://127.0.0.1:27140/ 2>/dev/null | grep '^finished in'
  "$BIN/strait-loadgen" rr 127.0.0.1:$opaque --rate 2000 --seconds "$SECS" --size 16384 --connections 8 >/dev/null
  curl -sf http://127.0.0.1:27191/metrics >/dev/null
  stop "$CLIENT_PID" "$SERVER_PID" "$opaque_pid"
}
if [ "$(cat "$OUT/profile.sha256" 2>/dev/null)" != "$STAMP" ] || [ ! -s "$PROFILE" ]; then
  echo "training the instrumented strait-proxy (${SECS}s of each kind of traffic)"
  (train)
  compgen -G "$RAW/*.profraw" >/dev/null || { echo "error: the training run left no profile in $RAW" >&2; exit 1; }
  "$PROFDATA" merge -o "$PROFILE" "$RAW"
  echo "$STAMP" >"$OUT/profile.sha256"
fi

build "$OUT/use" "-Cprofile-use=$PROFILE"
OPTIMISED=$OUT/use/$HOST/release/strait-proxy

# The optimised binary serves HTTP/1.1 (bench/strait-pair.sh waits for it)
# and HTTP/2 through the pair, and both proxies stop cleanly on SIGTERM
# (which also shows the answers were theirs).
check() {
  PROXY=$OPTIMISED
  THREADS=1
  bench_workdir strait-pgo-check
  source "$REPO/bench/strait-pair.sh"
  curl -sf --http2-prior-knowledge -H "Host: bench" http://127.0.0.1:27140/ >/dev/null \
    || { echo "error: the optimised strait-proxy pair does not answer HTTP/2" >&2; cat ./*.log >&2; exit 1; }
  stop "$CLIENT_PID" "$SERVER_PID"
}
(check)
cp "$OPTIMISED" "$OUT/strait-proxy.tmp"
mv "$OUT/strait-proxy.tmp" "$OUT/strait-proxy"
echo "$OUT/strait-proxy" >&3
