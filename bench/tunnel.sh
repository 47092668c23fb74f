#!/usr/bin/env bash
# Tunnel benchmark: bulk throughput (iperf3) and request latency at a fixed
# rate (strait-loadgen rr) through the west->east Strait gateways, against a
# direct connection and a stunnel pair (mutual TLS 1.3 over TCP) in the same
# run, with ratios. Release builds only (debug quinn is ~10x slower).
#
#   bench/tunnel.sh [SECONDS] [RATE]     defaults: 5 s per run, 1000 req/s
#
# STRAIT_BENCH_TRANSPORT=tcp measures the TLS-over-TCP transport instead
# of QUIC (one mTLS TCP connection per stream, like the stunnel pair).
#
# Needs iperf3, stunnel4, openssl, dig: installed with apt-get if missing.
# Everything listens on loopback only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
RATE=${2:-1000}

source bench/common.sh
bench_tools iperf3:iperf3 stunnel4:stunnel4 openssl:openssl dig:dnsutils

cargo build --release -q -p strait-cli --bin strait -p strait-tests --bin strait-loadgen
BIN=$PWD/target/release
bench_workdir strait-bench

# Backends.
iperf3 -s -B 127.0.0.1 -p 35201 >/dev/null 2>&1 & PIDS+=($!)
"$BIN/strait-loadgen" echo 127.0.0.1:35300 & PIDS+=($!)

# Strait: east exports iperf and echo; west imports them.
"$BIN/strait" certs root >/dev/null
"$BIN/strait" certs issuer --cluster west >/dev/null
"$BIN/strait" certs issuer --cluster east >/dev/null
cat > east-cluster.yaml <<'YAML'
services:
  - namespace: bench
    name: iperf
    export: true
    ports: [{ name: iperf, port: 5201 }]
    endpoints: [{ name: iperf-0, ip: 127.0.0.1, ports: { iperf: 35201 } }]
  - namespace: bench
    name: echo
    export: true
    ports: [{ name: echo, port: 7000 }]
    endpoints: [{ name: echo-0, ip: 127.0.0.1, ports: { echo: 35300 } }]
YAML
echo "services: []" > west-cluster.yaml
for c in west east; do
  if [ $c = west ]; then t=36; links="[{ name: east, addresses: [\"127.0.0.1:37143\"], transport: ${STRAIT_BENCH_TRANSPORT:-quic} }]"; else t=37; links='[{ name: west }]'; fi
  cat > $c.yaml <<YAML
cluster: $c
identity: { trustAnchors: root.pem, issuerCert: $c-issuer.pem, issuerKey: $c-issuer.key }
listen: { tunnel: "127.0.0.1:${t}143", admin: "127.0.0.1:${t}191", dns: "127.0.0.1:${t}353", destination: "127.0.0.1:${t}086" }
source: { file: $c-cluster.yaml }
imports: { vipRange: 127.76.0.0/16 }
tunnel: { maxUdpPayload: ${STRAIT_MAX_UDP_PAYLOAD:-6500} }
links: $links
YAML
done
# One worker thread per gateway, as stunnel carries one connection on one
# thread: the machine's cores are shared by both ends, both relays and the
# load generator.
THREADS=${STRAIT_BENCH_THREADS:-1}
STRAIT_LOG=warn "$BIN/strait" gateway --threads "$THREADS" --config east.yaml >east.log 2>&1 & PIDS+=($!)
STRAIT_LOG=warn "$BIN/strait" gateway --threads "$THREADS" --config west.yaml >west.log 2>&1 & PIDS+=($!)

# stunnel pair, mutual TLS 1.3 with pinned certificates.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=bench -keyout tls.key -out tls.pem 2>/dev/null
cat > stunnel-server.conf <<CONF
foreground = yes
pid =
[iperf]
accept = 127.0.0.1:39201
connect = 127.0.0.1:35201
cert = $WORK/tls.pem
key = $WORK/tls.key
CAfile = $WORK/tls.pem
verifyPeer = yes
sslVersion = TLSv1.3
[echo]
accept = 127.0.0.1:39300
connect = 127.0.0.1:35300
cert = $WORK/tls.pem
key = $WORK/tls.key
CAfile = $WORK/tls.pem
verifyPeer = yes
sslVersion = TLSv1.3
CONF
sed -e 's/^accept = 127.0.0.1:39/accept = 127.0.0.1:38/' \
    -e 's/^connect = 127.0.0.1:35201/connect = 127.0.0.1:39201/' \
    -e 's/^connect = 127.0.0.1:35300/connect = 127.0.0.1:39300/' \
    -e 's/^\[iperf\]/[iperf]\nclient = yes/' -e 's/^\[echo\]/[echo]\nclient = yes/' \
    stunnel-server.conf > stunnel-client.conf
stunnel4 stunnel-server.conf >stunnel-server.log 2>&1 & PIDS+=($!)
stunnel4 stunnel-client.conf >stunnel-client.log 2>&1 & PIDS+=($!)

# Wait for west to import both services.
for _ in $(seq 1 100); do
  IPERF_VIP=$(dig @127.0.0.1 -p 36353 +short iperf.bench.svc.clusterset.local A 2>/dev/null || true)
  ECHO_VIP=$(dig @127.0.0.1 -p 36353 +short echo.bench.svc.clusterset.local A 2>/dev/null || true)
  [ -n "$IPERF_VIP" ] && [ -n "$ECHO_VIP" ] && break
  sleep 0.1
done
[ -n "$IPERF_VIP" ] && [ -n "$ECHO_VIP" ] || { echo "imports did not appear"; cat west.log east.log; exit 1; }
sleep 0.5

if [ -n "${STRAIT_BENCH_HOLD:-}" ]; then
  # For profiling by hand: everything is up; Ctrl-C or kill to end.
  echo "holding: iperf VIP $IPERF_VIP:5201, echo VIP $ECHO_VIP:7000, stunnel 127.0.0.1:38201/38300, direct 127.0.0.1:35201/35300"
  sleep "$STRAIT_BENCH_HOLD"
  exit 0
fi

gbps() { python3 -c '
import json, sys
r = json.load(sys.stdin)
if "error" in r:
    sys.exit("iperf3: " + r["error"])
print("%.2f" % (r["end"]["sum_received"]["bits_per_second"] / 1e9))'; }
# iperf3's server takes one test at a time and may still be finishing the
# previous one: retry a busy server.
bulk() {
  for _ in 1 2 3 4 5; do
    if out=$(iperf3 -c "$1" -p "$2" -t "$SECS" -J | gbps 2>&1); then echo "$out"; return; fi
    sleep 1
  done
  echo "$out" >&2; return 1
}
rr() { "$BIN/strait-loadgen" rr "$1" --rate "$RATE" --seconds "$SECS" --size 64 --connections 4; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

echo "== bulk throughput, one TCP stream, ${SECS}s (iperf3) =="
D=$(bulk 127.0.0.1 35201); S=$(bulk 127.0.0.1 38201); T=$(bulk "$IPERF_VIP" 5201)
printf "%-10s %8s Gbit/s\n" direct "$D" stunnel "$S" strait "$T"
python3 -c "print('strait/stunnel = %.2f   strait/direct = %.2f' % ($T/$S, $T/$D))"

echo "west's tunnel to east: $(curl -s http://127.0.0.1:36191/api/peers)"
echo "== request latency, 64 B echo at ${RATE}/s over 4 connections, ${SECS}s =="
RD=$(rr 127.0.0.1:35300); RS=$(rr 127.0.0.1:38300); RT=$(rr "$ECHO_VIP:7000")
show() { printf "%-10s p50 %8s us   p99 %8s us   (%s req/s)\n" "$1" "$(echo "$2" | field p50_us)" "$(echo "$2" | field p99_us)" "$(echo "$2" | field rate)"; }
show direct "$RD"; show stunnel "$RS"; show strait "$RT"
python3 - "$RD" "$RS" "$RT" <<'PY'
import json, sys
d, s, t = (json.loads(a) for a in sys.argv[1:])
print("added p50: stunnel %.1f us, strait %.1f us;  added p99: stunnel %.1f us, strait %.1f us" % (
    s["p50_us"] - d["p50_us"], t["p50_us"] - d["p50_us"], s["p99_us"] - d["p99_us"], t["p99_us"] - d["p99_us"]))
PY
