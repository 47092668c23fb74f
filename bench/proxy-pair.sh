# The two proxy pairs and their backend, for bench/proxy.sh and
# bench/proxy-instructions.sh: sourced from the repository root with THREADS
# set and, optionally, WRAP (a command prefix for the four proxy processes,
# such as valgrind). Leaves BIN, PROXY (the strait-proxy binary), WORK (the
# current directory), PIDS, BACKEND, CLIENT_PID (strait's client proxy),
# SERVER_PID, HAPROXY_PID (HAProxy's client side) and HAPROXY_SERVER_PID; a
# trap stops them all.
# Installs wrk, nghttp2-client (h2load), haproxy and openssl if missing.
WRAP=(${WRAP:-})
source bench/common.sh
bench_tools wrk:wrk h2load:nghttp2-client haproxy:haproxy openssl:openssl
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The proxy as its image ships it: built on its own (built together with
# the gateway, it would take the features kube asks of shared crates, 1 MB
# more) and optimised with its training run's profile (scripts/build-proxy.sh).
# STRAIT_BENCH_PGO=0 measures the plain release build instead.
cargo build --release -q -p strait-cli --bin strait -p strait-tests --bin strait-loadgen
BIN=$PWD/target/release
if [ "${STRAIT_BENCH_PGO:-1}" = 0 ]; then
  # Naming the target, as scripts/build-proxy.sh does: that changes every
  # symbol's hash, and proxy/symbol-order.txt names those of such builds.
  HOST=$(rustc -vV | awk '/^host:/ {print $2}')
  cargo build --release -q -p strait-proxy --bin strait-proxy --target "$HOST"
  PROXY=$PWD/target/$HOST/release/strait-proxy
else
  PROXY=$(STRAIT_PGO_TOOLS=$BIN scripts/build-proxy.sh)
fi
echo "strait-proxy: $PROXY"
REPO=$PWD
bench_workdir strait-proxy-bench
source "$REPO/bench/strait-pair.sh"

# HAProxy pair: h2 over TLS 1.3 with client certificates between; two
# processes, one per side, as two sidecars are (and as the strait pair is:
# one process doing both sides would hand requests to itself without a
# wake-up in between).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=bench -keyout tls.key -out tls.crt 2>/dev/null
cat tls.crt tls.key > tls.pem
haproxy_global="global
  nbthread 1
  maxconn 9500
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always"
cat > haproxy-client.cfg <<CFG
$haproxy_global
frontend client_side
  bind 127.0.0.1:28140 proto h2
  bind 127.0.0.1:28141
  default_backend to_server_side
backend to_server_side
  server peer 127.0.0.1:28143 ssl crt $WORK/tls.pem ca-file $WORK/tls.crt verify required alpn h2
CFG
cat > haproxy-server.cfg <<CFG
$haproxy_global
frontend server_side
  bind 127.0.0.1:28143 ssl crt $WORK/tls.pem ca-file $WORK/tls.crt verify required alpn h2
  default_backend app
backend app
  server app $BACKEND
CFG
"${WRAP[@]}" haproxy -f haproxy-server.cfg -db >haproxy-server.log 2>&1 & PIDS+=($!)
HAPROXY_SERVER_PID=$!
"${WRAP[@]}" haproxy -f haproxy-client.cfg -db >haproxy-client.log 2>&1 & PIDS+=($!)
HAPROXY_PID=$!

bench_answers http://127.0.0.1:28141/ "the HAProxy pair" haproxy-*.log
