#!/usr/bin/env bash
# Sidecar proxy benchmark: a client strait-proxy and a server strait-proxy
# with mutual TLS between them, against a direct connection and against a
# HAProxy pair (two processes, HTTP/2 over TLS 1.3 with client certificates
# between), in one run, with ratios:
#   - requests/s at 50 connections, HTTP/1.1 (wrk) and HTTP/2 (h2load);
#   - p50/p99 latency at a fixed 1000 requests/s (strait-loadgen http),
#     and the latency each pair adds;
#   - the client proxy's RSS idle and holding 10,000 idle keep-alive
#     connections (HAProxy client side's with 9,000, for comparison).
#
#   bench/proxy.sh [SECONDS]        default 10 s per throughput run
#
# Throughput is measured in ROUNDS rounds (default 3, env STRAIT_BENCH_ROUNDS),
# each running direct, the strait pair and the HAProxy pair in turn, so a
# neighbour's burst on the shared machine falls on both pairs rather than on
# one; the ratio printed last is the median of the rounds' ratios.
#
# Last, HTTP/1.1 again with each pair's two proxies pinned to one CPU and
# wrk and the backend to another (taskset), so that both pairs get the
# same core whatever the scheduler would have made of four busy processes
# on two; besides requests/s it prints each pair's CPU time (user and
# system, from /proc/<pid>/stat) per request and how busy its core was.
#
# Installs wrk, nghttp2-client (h2load), haproxy, openssl and util-linux
# (taskset) if missing. Loopback only; everything stops when the script
# exits. One worker thread per proxy (STRAIT_BENCH_THREADS), HAProxy with
# nbthread 1; until the last section, on the cores this script may use,
# shared with the load generator and the backend.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
THREADS=${STRAIT_BENCH_THREADS:-1}
ROUNDS=${STRAIT_BENCH_ROUNDS:-3}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "STRAIT_BENCH_ROUNDS must be a positive number, not '$ROUNDS'" >&2; exit 2; }

source bench/proxy-pair.sh
bench_tools taskset:util-linux

rss_kib() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
# Private memory: what the process alone holds (RSS also counts the pages
# of the executable it maps, shared with every other strait-proxy).
private_kib() { awk '/^(Private_Clean|Private_Dirty):/ {s += $2} END {print s}' /proc/$1/smaps_rollup; }
IDLE_RSS=$(rss_kib $CLIENT_PID)
IDLE_PRIVATE=$(private_kib $CLIENT_PID)

wrk_rps() { wrk -t1 -c50 -d"${SECS}s" -H "Host: bench" "http://$1/" | awk '/Requests\/sec/ {print $2}'; }
h2_rps() { h2load -c50 -m10 -t1 -D "$SECS" -H ":authority: bench" "http://$1/" 2>/dev/null | awk '/^finished in/ {gsub(",",""); print $4}'; }
lat() { "$BIN/strait-loadgen" http "$1" --rate 1000 --seconds 5 --connections 8 --host bench; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

# ROUNDS rounds of `$1` (a rate function) against direct ($2), the strait
# pair ($3) and the HAProxy pair ($4): each round's rates and ratios, then
# the medians.
rounds() {
  local rate=$1 direct=$2 strait=$3 haproxy=$4 rows=() r
  for r in $(seq 1 "$ROUNDS"); do
    local d s h
    d=$($rate "$direct"); s=$($rate "$strait"); h=$($rate "$haproxy")
    printf "round %d: direct %10s   strait pair %10s   haproxy pair %10s req/s\n" "$r" "$d" "$s" "$h"
    rows+=("$d $s $h")
  done
  printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda xs: statistics.median(xs)
print("median: direct %.0f   strait pair %.0f   haproxy pair %.0f req/s" % tuple(med([r[i] for r in rows]) for i in range(3)))
sh = [s / h for _, s, h in rows]
print("strait/haproxy = %.2f (rounds %s)   strait/direct = %.2f" % (
    med(sh), " ".join("%.2f" % x for x in sh), med([s / d for d, s, _ in rows])))'
}

echo "== HTTP/1.1, 50 connections, ${SECS}s (wrk), $ROUNDS rounds =="
rounds wrk_rps $BACKEND 127.0.0.1:27140 127.0.0.1:28141

echo "== HTTP/2, 50 connections x 10 streams, ${SECS}s (h2load), $ROUNDS rounds =="
rounds h2_rps $BACKEND 127.0.0.1:27140 127.0.0.1:28140

echo "== latency at 1000 req/s, HTTP/1.1 keep-alive, 8 connections, 5s =="
LD=$(lat $BACKEND); LS=$(lat 127.0.0.1:27140); LH=$(lat 127.0.0.1:28141)
show() { printf "%-14s p50 %8s us   p99 %8s us\n" "$1" "$(echo "$2" | field p50_us)" "$(echo "$2" | field p99_us)"; }
show direct "$LD"; show "strait pair" "$LS"; show "haproxy pair" "$LH"
python3 - "$LD" "$LS" "$LH" <<'PY'
import json, sys
d, s, h = (json.loads(a) for a in sys.argv[1:])
print("added p50: strait %.0f us, haproxy %.0f us;  added p99: strait %.0f us, haproxy %.0f us" % (
    s["p50_us"] - d["p50_us"], h["p50_us"] - d["p50_us"], s["p99_us"] - d["p99_us"], h["p99_us"] - d["p99_us"]))
PY

echo "== client proxy memory =="
# RSS (KiB) of process $3 while $2 idle connections to $1 are held. Idle
# means idle: the last connections opened get the second after which an
# idle HTTP/1 connection is parked.
rss_holding() {
  "$BIN/strait-loadgen" idle "$1" --connections "$2" --seconds 30 >"idle-$1.log" 2>&1 & local idler=$!
  for _ in $(seq 1 250); do grep -q idle_connections "idle-$1.log" && break; sleep 0.1; done
  grep -q idle_connections "idle-$1.log" || { echo "idle connections to $1 not established:" >&2; cat "idle-$1.log" >&2; }
  sleep 2
  rss_kib "$3"
  kill $idler 2>/dev/null || true
}
AFTER_RSS=$(rss_kib $CLIENT_PID)
HELD_RSS=$(rss_holding 127.0.0.1:27140 10000 $CLIENT_PID)
printf "RSS idle: %.1f MiB (private %.1f MiB), %.1f MiB after the runs; with 10000 idle connections: %.1f MiB (%.1f KB per connection)\n" "$(echo "$IDLE_RSS/1024" | bc -l)" "$(echo "$IDLE_PRIVATE/1024" | bc -l)" "$(echo "$AFTER_RSS/1024" | bc -l)" "$(echo "$HELD_RSS/1024" | bc -l)" "$(echo "($HELD_RSS-$AFTER_RSS)*1.024/10000" | bc -l)"
# (9,000: HAProxy sizes its descriptors for twice its maxconn, and the hard
# limit here is 20,000.)
HA_IDLE_RSS=$(rss_kib $HAPROXY_PID)
HA_HELD_RSS=$(rss_holding 127.0.0.1:28141 9000 $HAPROXY_PID)
printf "HAProxy client side RSS after the runs: %.1f MiB; with 9000 idle connections: %.1f MiB (%.1f KB per connection)\n" "$(echo "$HA_IDLE_RSS/1024" | bc -l)" "$(echo "$HA_HELD_RSS/1024" | bc -l)" "$(echo "($HA_HELD_RSS-$HA_IDLE_RSS)*1.024/9000" | bc -l)"

# The first two CPUs this script may run on (not CPUs 0 and 1: a
# container's may be any).
read -r CPU_LOAD CPU_PAIR < <(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(*(c[:2] if len(c) > 1 else ["-", "-"]))')
if [ "$CPU_PAIR" != "-" ]; then
  echo "== HTTP/1.1 on one core: each pair's proxies on CPU $CPU_PAIR, wrk and the backend on CPU $CPU_LOAD, ${SECS}s, $ROUNDS rounds =="
  for p in $CLIENT_PID $SERVER_PID $HAPROXY_PID $HAPROXY_SERVER_PID; do taskset -a -p -c "$CPU_PAIR" "$p" >/dev/null; done
  taskset -a -p -c "$CPU_LOAD" "${PIDS[0]}" >/dev/null
  ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
  # "requests/s CPU-microseconds-per-request busy-percent" of wrk through
  # $1, the pair being the processes $2...
  pinned() {
    local url=$1 t0 t1 start end out; shift
    t0=$(ticks "$@"); start=$(date +%s.%N)
    out=$(taskset -c "$CPU_LOAD" wrk -t1 -c50 -d"${SECS}s" -H "Host: bench" "http://$url/")
    t1=$(ticks "$@"); end=$(date +%s.%N)
    echo "$out" | python3 -c '
import re, sys
text = sys.stdin.read()
n = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
cpu = (int(sys.argv[2]) - int(sys.argv[1])) / float(sys.argv[5])
print("%.0f %.2f %.0f" % (rps, cpu * 1e6 / n, 100 * cpu / (float(sys.argv[4]) - float(sys.argv[3]))))' \
      "$t0" "$t1" "$start" "$end" "$(getconf CLK_TCK)"
  }
  rows=()
  for r in $(seq 1 "$ROUNDS"); do
    read -r s_rps s_cpu s_busy < <(pinned 127.0.0.1:27140 "$CLIENT_PID" "$SERVER_PID")
    read -r h_rps h_cpu h_busy < <(pinned 127.0.0.1:28141 "$HAPROXY_PID" "$HAPROXY_SERVER_PID")
    printf "round %d: strait pair %8s req/s, %6s us CPU per request (core %s%% busy)   haproxy pair %8s req/s, %6s us (%s%%)\n" \
      "$r" "$s_rps" "$s_cpu" "$s_busy" "$h_rps" "$h_cpu" "$h_busy"
    rows+=("$s_rps $s_cpu $h_rps $h_cpu")
  done
  printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
med = statistics.median
print("median strait/haproxy: requests/s %.2f, CPU per request %.2f" % (
    med([r[0] / r[2] for r in rows]), med([r[1] / r[3] for r in rows])))'
else
  echo "== HTTP/1.1 on one core: not run, this script may use one CPU only =="
fi
