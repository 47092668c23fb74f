#!/usr/bin/env bash
# DNS benchmark: strait-dns against Knot DNS serving the same zone, in the
# same run, measured with dnsperf, with ratios strait/knot.
#
#   bench/dns.sh [SECONDS]       default 5 s per dnsperf run
#
# The zone: STRAIT_BENCH_SERVICES (default 10000) services
# `svc-<i>.ns-<i % 100>.svc.clusterset.local`, one A and one `_http._tcp` SRV
# each (dns/examples/serve.rs builds it; `serve --write-zone` writes the very
# same snapshot as a master file for knotd, and the script checks that both
# answer alike before measuring). Two query mixes of 100000 queries, cycled:
#   existing  80% A, 20% SRV `_http._tcp.<svc>...`, every name exists;
#   half-nx   the same, but every other query names a missing service
#             (NXDOMAIN with the SOA in the authority section).
#
# Per server and mix, two kinds of dnsperf run, each repeated
# STRAIT_BENCH_REPS times (default 3) alternating the servers, and the
# median of each figure printed:
#   1. throughput: closed loop, STRAIT_BENCH_OUTSTANDING (default 100) queries
#      in flight: queries/s, dnsperf's average latency, and the server's CPU
#      time per query (utime+stime from /proc over the run). At saturation
#      the average latency is mostly queueing (Little's law: in flight / qps),
#      so:
#   2. latency: open loop at a fixed rate, the same for both servers: half of
#      knot's queries/s in that mix (the goal is strait >= knot/2 with p99
#      < 1 ms), or STRAIT_BENCH_RATE. dnsperf 2.10 has no percentile output,
#      so it runs with -v (one line per response with its latency, written
#      to a file and sorted afterwards): p50, p99, p99.9. Timed-out queries
#      are counted as lost (a lost query is worse than any percentile).
#
# CPUs: with 2 or more cores, each server runs pinned to CPU 0 (strait-dns
# with one tokio worker thread, knotd with one UDP worker, one TCP worker and
# one background worker; both have a few idle helper threads) and dnsperf
# (one thread) to CPU 1. One dnsperf thread cannot ask as fast as either
# server answers on a small machine: when the server CPU column is well under
# 100%, the client was the limit and queries/s is a lower bound; the CPU time
# per query compares the servers independently of the client.
#
# Noise: the script measures the CPU time everything else on the machine
# took during each run and says so when it exceeds 10% of a CPU. On a shared
# 2-core VM the latency tail (p99 and beyond) is set by millisecond stalls
# of the machine, not by the server: knot alone varies from 0.2 to 1.4 ms
# p99 between consecutive runs; hence the repetitions.
#
# STRAIT_BENCH_SERVE=PATH benchmarks another build of the `serve` example
# (e.g. an older commit's) instead of building this tree's.
#
# Needs dnsperf, knotd and dig: installed with apt-get if missing.
# Everything listens on loopback only and stops when the script exits.
# Release build only (a debug build is several times slower).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
REPS=${STRAIT_BENCH_REPS:-3}
SERVICES=${STRAIT_BENCH_SERVICES:-10000}
OUTSTANDING=${STRAIT_BENCH_OUTSTANDING:-100}
QUERIES=100000
STRAIT_PORT=38353
KNOT_PORT=38354

need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v knotd >/dev/null || [ -x /usr/sbin/knotd ] || need+=(knot)
command -v dig >/dev/null || need+=(dnsutils)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
KNOTD=$(command -v knotd || echo /usr/sbin/knotd)

if [ -n "${STRAIT_BENCH_SERVE:-}" ]; then
  SERVE=$STRAIT_BENCH_SERVE
else
  cargo build --release -q -p strait-dns --example serve
  SERVE=$PWD/target/release/examples/serve
fi
WORK=$(mktemp -d /tmp/strait-dns-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$(nproc)" -ge 2 ]; then
  SERVER_CPU=(taskset -c 0)
  CLIENT_CPU=(taskset -c 1)
  cpus="servers on CPU 0, dnsperf on CPU 1"
else
  SERVER_CPU=()
  CLIENT_CPU=()
  cpus="one CPU shared by server and dnsperf"
fi
TICKS=$(getconf CLK_TCK)

# The zone, for knot: the same snapshot strait serves (fixed serial).
"$SERVE" --services "$SERVICES" --write-zone "$WORK/clusterset.local.zone" 2>/dev/null
cat > "$WORK/knot.conf" <<CONF
server:
    rundir: "$WORK"
    listen: 127.0.0.1@$KNOT_PORT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/db"
log:
  - target: stderr
    any: error
template:
  - id: default
    storage: "$WORK"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: clusterset.local
    file: clusterset.local.zone
CONF
mkdir -p "$WORK/db"

"${SERVER_CPU[@]}" "$SERVE" --services "$SERVICES" --threads 1 \
  --listen "127.0.0.1:$STRAIT_PORT" >"$WORK/strait.log" 2>&1 & STRAIT_PID=$!; PIDS+=($!)
"${SERVER_CPU[@]}" "$KNOTD" -c "$WORK/knot.conf" >"$WORK/knot.log" 2>&1 & KNOT_PID=$!; PIDS+=($!)

wait_ready() { # port name
  for _ in $(seq 100); do
    if dig @127.0.0.1 -p "$1" +short +tries=1 +time=1 clusterset.local SOA 2>/dev/null | grep -q hostmaster; then
      return 0
    fi
    sleep 0.2
  done
  echo "$2 did not answer on port $1:" >&2
  cat "$WORK/$2.log" >&2
  exit 1
}
wait_ready "$STRAIT_PORT" strait
wait_ready "$KNOT_PORT" knot

# Both must give the same answers before their speed is compared.
answers() { # port
  for q in "svc-7.ns-7.svc.clusterset.local A" \
    "_http._tcp.svc-42.ns-42.svc.clusterset.local SRV" \
    "svc-9.ns-9.svc.clusterset.local SRV" \
    "missing-1.ns-1.svc.clusterset.local A" \
    "dns-version.clusterset.local TXT"; do
    # shellcheck disable=SC2086
    dig @127.0.0.1 -p "$1" +norec +noall +comments +answer +authority +additional $q |
      grep -v -e '^;; ->>HEADER' -e '^;; Got answer' -e '^$' -e 'OPT PSEUDOSECTION' -e 'EDNS:' |
      sed 's/[[:space:]]\+/ /g'
    dig @127.0.0.1 -p "$1" +norec $q | grep -o 'status: [A-Z]*'
  done
}
if ! diff <(answers "$STRAIT_PORT") <(answers "$KNOT_PORT") >"$WORK/answers.diff"; then
  echo "strait-dns and knot answer differently:" >&2
  cat "$WORK/answers.diff" >&2
  exit 1
fi

# Query files (deterministic; every service is asked for).
awk -v n="$SERVICES" -v q="$QUERIES" 'BEGIN {
  for (k = 0; k < q; k++) {
    j = (k * 7919 + 13) % n
    if (k % 5 == 4) printf "_http._tcp.svc-%d.ns-%d.svc.clusterset.local SRV\n", j, j % 100
    else printf "svc-%d.ns-%d.svc.clusterset.local A\n", j, j % 100
  }
}' >"$WORK/existing.txt"
awk -v n="$SERVICES" -v q="$QUERIES" 'BEGIN {
  for (k = 0; k < q; k++) {
    h = int(k / 2); j = (h * 7919 + 13) % n
    if (k % 2 == 1) printf "missing-%d.ns-%d.svc.clusterset.local A\n", j, j % 100
    else if (h % 5 == 4) printf "_http._tcp.svc-%d.ns-%d.svc.clusterset.local SRV\n", j, j % 100
    else printf "svc-%d.ns-%d.svc.clusterset.local A\n", j, j % 100
  }
}' >"$WORK/half-nx.txt"

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# CPU time used by the whole machine (user, nice, system, irq, softirq).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
TIMEFORMAT='%U %S'
OTHER_MAX=0

# measured SERVER_PID OUT CMD... : runs CMD (dnsperf) with stdout to OUT,
# sets SERVER_TICKS (the server's CPU ticks during the run) and records in
# OTHER_MAX the CPU share of everything but the server and dnsperf, so
# that a run disturbed by other work on the machine shows.
measured() {
  local pid=$1 out=$2 b0 b1 t0 t1 start end client
  shift 2
  b0=$(busy_ticks)
  t0=$(cpu_ticks "$pid")
  start=$(date +%s.%N)
  { time "$@" >"$out" 2>/dev/null; } 2>"$WORK/time"
  end=$(date +%s.%N)
  t1=$(cpu_ticks "$pid")
  b1=$(busy_ticks)
  SERVER_TICKS=$((t1 - t0))
  client=$(awk -v hz="$TICKS" '{ printf "%d", ($1 + $2) * hz }' "$WORK/time")
  OTHER_MAX=$(awk -v m="$OTHER_MAX" -v b=$((b1 - b0 - SERVER_TICKS - client)) -v hz="$TICKS" \
    -v s="$start" -v e="$end" 'BEGIN { o = 100 * b / hz / (e - s); if (o < 0) o = 0; printf "%.0f", (o > m ? o : m) }')
}
field() { # file pattern -> first number after the pattern
  sed -n "s/^ *$2 *\([0-9.]*\).*/\1/p" "$1" | head -1
}

# throughput PORT PID FILE -> sets QPS LAT LOST CPU_PCT CPU_US
throughput() {
  local out=$WORK/run.txt
  measured "$2" "$out" "${CLIENT_CPU[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$3" -l "$SECS" -q "$OUTSTANDING"
  QPS=$(field "$out" "Queries per second:")
  LAT=$(field "$out" "Average Latency (s):")
  LOST=$(field "$out" "Queries lost:")
  local done_q runtime
  done_q=$(field "$out" "Queries completed:")
  runtime=$(field "$out" "Run time (s):")
  CPU_PCT=$(awk -v d="$SERVER_TICKS" -v hz="$TICKS" -v r="$runtime" 'BEGIN { printf "%.0f", 100 * d / hz / r }')
  CPU_US=$(awk -v d="$SERVER_TICKS" -v hz="$TICKS" -v n="$done_q" 'BEGIN { printf "%.2f", 1e6 * d / hz / n }')
}

# latency PORT PID FILE RATE -> sets P50 P99 P999 LLOST (milliseconds)
latency() {
  # Into a file, processed afterwards: a pipe would run awk beside the
  # measurement, on one of the two CPUs.
  measured "$2" "$WORK/verbose" "${CLIENT_CPU[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$3" \
    -l "$SECS" -q "$OUTSTANDING" -Q "$4" -v
  awk -v lost="$WORK/lost" '$1 == ">" { if ($2 == "T") t++; else print $NF * 1000 } END { print t + 0 > lost }' \
    "$WORK/verbose" | sort -g >"$WORK/lat"
  rm -f "$WORK/verbose"
  LLOST=$(cat "$WORK/lost")
  read -r P50 P99 P999 < <(awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "- - -"; exit }
    printf "%.3f %.3f %.3f\n", v[int(NR * 0.5) + 1], v[int(NR * 0.99) + 1], v[int(NR * 0.999) + 1] }' "$WORK/lat")
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
sum() { printf '%s\n' "$@" | awk '{ s += $1 } END { print s + 0 }'; }

echo "strait-dns vs knotd $("$KNOTD" --version | awk '{ print $NF }'): $SERVICES services, $cpus"
echo "dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ { print $2 }'): ${SECS}s runs, median of $REPS;" \
  "throughput runs keep $OUTSTANDING queries in flight"
verdict=PASS
for mix in existing half-nx; do
  file=$WORK/$mix.txt
  for s in k s; do
    for f in qps lat lost cpu us p50 p99 p999 llost; do eval "${s}_$f=()"; done
  done
  for _ in $(seq "$REPS"); do
    throughput "$KNOT_PORT" "$KNOT_PID" "$file"
    k_qps+=("$QPS") k_lat+=("$LAT") k_lost+=("$LOST") k_cpu+=("$CPU_PCT") k_us+=("$CPU_US")
    throughput "$STRAIT_PORT" "$STRAIT_PID" "$file"
    s_qps+=("$QPS") s_lat+=("$LAT") s_lost+=("$LOST") s_cpu+=("$CPU_PCT") s_us+=("$CPU_US")
  done
  knot_qps=$(median "${k_qps[@]}")
  rate=${STRAIT_BENCH_RATE:-$(awk -v q="$knot_qps" 'BEGIN { printf "%d", int(q / 2 / 1000) * 1000 }')}
  for _ in $(seq "$REPS"); do
    latency "$KNOT_PORT" "$KNOT_PID" "$file" "$rate"
    k_p50+=("$P50") k_p99+=("$P99") k_p999+=("$P999") k_llost+=("$LLOST")
    latency "$STRAIT_PORT" "$STRAIT_PID" "$file" "$rate"
    s_p50+=("$P50") s_p99+=("$P99") s_p999+=("$P999") s_llost+=("$LLOST")
  done
  for s in k s; do
    for f in qps lat cpu us p50 p99 p999; do eval "${s}_$f=\$(median \"\${${s}_$f[@]}\")"; done
    for f in lost llost; do eval "${s}_$f=\$(sum \"\${${s}_$f[@]}\")"; done
  done

  echo
  echo "mix $mix ($(awk '{ print $2 }' "$file" | sort | uniq -c | awk '{ printf "%s%d %s", sep, $1, $2; sep = ", " }') per $QUERIES queries)"
  printf "  %-12s %10s %9s %6s %7s %10s | at %d q/s: %8s %8s %8s %6s\n" \
    "" "queries/s" "avg ms" "lost" "CPU" "CPU us/q" "$rate" "p50 ms" "p99 ms" "p99.9 ms" "lost"
  for s in strait knot; do
    if [ $s = strait ]; then set -- strait-dns "$s_qps" "$s_lat" "$s_lost" "$s_cpu" "$s_us" "$s_p50" "$s_p99" "$s_p999" "$s_llost"
    else set -- knot "$k_qps" "$k_lat" "$k_lost" "$k_cpu" "$k_us" "$k_p50" "$k_p99" "$k_p999" "$k_llost"; fi
    printf "  %-12s %10.0f %9.3f %6s %6s%% %10s | %*s %8s %8s %8s %6s\n" \
      "$1" "$2" "$(awk -v l="$3" 'BEGIN { print l * 1000 }')" "$4" "$5" "$6" $((${#rate} + 9)) "" "$7" "$8" "$9" "${10}"
  done
  printf "  %-12s %10s %9s %6s %7s %10s | %*s %8s %8s %8s\n" "strait/knot" \
    "$(ratio "$s_qps" "$k_qps")" "$(ratio "$s_lat" "$k_lat")" "" "" "$(ratio "$s_us" "$k_us")" \
    $((${#rate} + 9)) "" "$(ratio "$s_p50" "$k_p50")" "$(ratio "$s_p99" "$k_p99")" "$(ratio "$s_p999" "$k_p999")"

  if ! awk -v s="$s_qps" -v k="$k_qps" -v p="$s_p99" -v l="$s_llost" 'BEGIN { exit !(s >= k / 2 && p < 1 && l == 0) }'; then
    verdict=FAIL
  fi
done
echo
echo "other processes took up to ${OTHER_MAX}% of a CPU during a run$([ "$OTHER_MAX" -gt 10 ] && echo ": numbers disturbed, run again on a quiet machine")"
echo "goal (strait >= knot/2 queries/s, p99 < 1 ms at knot/2 q/s, nothing lost; medians): $verdict"
