#!/usr/bin/env bash
# Opaque TCP through one strait-proxy (outbound, --opaque-ports, to its
# --outbound-target), against a direct connection and HAProxy in TCP mode
# (nbthread 1), in one run:
#   - throughput of one iperf3 stream, and each proxy's CPU seconds per GB;
#   - RSS per idle connection: N connections each echo SIZE bytes once
#     through the proxy, then stay open, idle.
#
#   bench/proxy-opaque.sh [N] [SIZE]     default 2000 connections, 262144 bytes
#
# Installs iperf3 and haproxy if missing. Loopback only; everything stops
# when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
SIZE=${2:-262144}

source bench/common.sh
bench_tools iperf3:iperf3 haproxy:haproxy
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The proxy as its image ships it (see proxy-pair.sh).
cargo build --release -q -p strait-cli --bin strait -p strait-tests --bin strait-loadgen
BIN=$PWD/target/release
PROXY=$(STRAIT_PGO_TOOLS=$BIN scripts/build-proxy.sh)
bench_workdir strait-opaque-bench
"$BIN/strait" certs root >/dev/null
"$BIN/strait" certs issuer --cluster bench >/dev/null

ECHO=127.0.0.1:25090
IPERF=25201
cat > echo.py <<'PY'
import asyncio, sys
async def serve(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    server = await asyncio.start_server(serve, host, int(port), backlog=4096)
    await server.serve_forever()
asyncio.run(main())
PY
cat > idle.py <<'PY'
# idle.py PORT N SIZE PID: N connections through PORT each echo SIZE bytes
# once, then idle; prints the KiB of RSS process PID gained per connection.
import asyncio, sys
port, n, size, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss():
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])
async def one(held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x00\x01binary" + b"x" * (size - 8))
    await w.drain()
    got = 0
    while got < size:
        data = await r.read(65536)
        if not data:
            sys.exit("closed early")
        got += len(data)
    held.append(w)
async def main():
    before, held = rss(), []
    for i in range(0, n, 100):
        await asyncio.gather(*(one(held) for _ in range(min(100, n - i))))
    await asyncio.sleep(2)
    print("%.1f" % ((rss() - before) / n))
asyncio.run(main())
PY
python3 echo.py $ECHO & PIDS+=($!)
iperf3 -s -p $IPERF >/dev/null 2>&1 & PIDS+=($!)

# strait-proxy: the outbound listener forwards everything to one target.
proxy() { # PORT TARGET
  STRAIT_LOG=warn STRAIT_THREADS=1 "$PROXY" run \
    --trust-anchors root.pem --issuer-cert bench-issuer.pem --issuer-key bench-issuer.key \
    --identity spiffe://bench.strait.local/ns/bench/sa/client \
    --outbound-listen 127.0.0.1:$1 --inbound-listen 127.0.0.1:$(($1 + 3)) \
    --admin-listen 127.0.0.1:$(($1 + 51)) --inbound-target 127.0.0.1:9 \
    --outbound-target $2 --opaque-ports $1 >proxy-$1.log 2>&1 & PIDS+=($!)
  LAST=$!
}
haproxy_tcp() { # PORT TARGET
  cat > haproxy-$1.cfg <<CFG
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
listen fwd
  bind 127.0.0.1:$1
  server up $2
CFG
  haproxy -f haproxy-$1.cfg -db >haproxy-$1.log 2>&1 & PIDS+=($!)
  LAST=$!
}
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' /proc/$1/stat; }
# iperf3 through PORT (direct when PID is empty): "Gbit/s CPU-s-per-GB".
tput() { # PORT [PID]
  local c0=0 c1=0 out
  [ -n "${2:-}" ] && c0=$(cpu_s $2)
  out=$(iperf3 -c 127.0.0.1 -p $1 -t 5 -J)
  [ -n "${2:-}" ] && c1=$(cpu_s $2)
  echo "$out" | python3 -c "
import json, sys
e = json.load(sys.stdin)['end']['sum_received']
print('%.2f %.2f' % (e['bits_per_second'] / 1e9, ($c1 - $c0) / (e['bytes'] / 1e9)))"
}

proxy 27240 127.0.0.1:$IPERF; STRAIT_T=$LAST
haproxy_tcp 28240 127.0.0.1:$IPERF; HAPROXY_T=$LAST
proxy 27340 $ECHO; STRAIT_E=$LAST
haproxy_tcp 28340 $ECHO; HAPROXY_E=$LAST
sleep 1

echo "== one iperf3 stream, 5 s =="
read D _ < <(tput $IPERF)
read S SC < <(tput 27240 $STRAIT_T)
read H HC < <(tput 28240 $HAPROXY_T)
printf "%-9s %6s Gbit/s\n" direct "$D"
printf "%-9s %6s Gbit/s, %s CPU s per GB\n" strait "$S" "$SC" haproxy "$H" "$HC"
python3 -c "print('strait/haproxy = %.2f   strait/direct = %.2f   CPU per GB strait/haproxy = %.2f' % ($S/$H, $S/$D, $SC/$HC))"

echo "== $N idle connections after $SIZE bytes each =="
SK=$(python3 idle.py 27340 "$N" "$SIZE" $STRAIT_E)
HK=$(python3 idle.py 28340 "$N" "$SIZE" $HAPROXY_E)
echo "strait:  $SK KiB per connection (RSS $(awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$STRAIT_E/status) MiB)"
echo "haproxy: $HK KiB per connection (RSS $(awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$HAPROXY_E/status) MiB)"
