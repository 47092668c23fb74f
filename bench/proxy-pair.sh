# The two proxy pairs and their backend, for bench/proxy.sh and
# bench/proxy-instructions.sh: sourced from the repository root with THREADS
# set and, optionally, WRAP (a command prefix for the four proxy processes,
# such as valgrind). Leaves BIN, WORK (the current directory), PIDS,
# BACKEND, CLIENT_PID (strait's client proxy), SERVER_PID, HAPROXY_PID
# (HAProxy's client side) and HAPROXY_SERVER_PID; a trap stops them all.
# Installs wrk, nghttp2-client (h2load), haproxy and openssl if missing.
WRAP=(${WRAP:-})
source bench/common.sh
bench_tools wrk:wrk h2load:nghttp2-client haproxy:haproxy openssl:openssl
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The proxy on its own, as its image builds it: built together with the
# gateway, it would take the features kube asks of shared crates (1 MB more).
cargo build --release -q -p strait-proxy --bin strait-proxy
cargo build --release -q -p strait-cli --bin strait -p strait-tests --bin strait-loadgen
BIN=$PWD/target/release
bench_workdir strait-proxy-bench

# Ports below the ephemeral range: the idle-connection runs leave thousands
# of client sockets (and TIME_WAITs) on ephemeral ports.
BACKEND=127.0.0.1:25080
"$BIN/strait-loadgen" http-server $BACKEND & PIDS+=($!)

# Strait pair.
"$BIN/strait" certs root >/dev/null
"$BIN/strait" certs issuer --cluster bench >/dev/null
cat > destinations.yaml <<YAML
destinations:
  - authority: "bench:80"
    endpoints:
      - { addr: "$BACKEND", identity: "spiffe://bench.strait.local/ns/bench/sa/server" }
YAML
common=(--trust-anchors root.pem --issuer-cert bench-issuer.pem --issuer-key bench-issuer.key)
STRAIT_LOG=warn STRAIT_THREADS=$THREADS "${WRAP[@]}" "$BIN/strait-proxy" run "${common[@]}" \
  --identity spiffe://bench.strait.local/ns/bench/sa/server \
  --outbound-listen 127.0.0.1:26140 --inbound-listen 127.0.0.1:26143 --admin-listen 127.0.0.1:26191 \
  --inbound-target $BACKEND >server.log 2>&1 & PIDS+=($!)
SERVER_PID=$!
STRAIT_LOG=warn STRAIT_THREADS=$THREADS "${WRAP[@]}" "$BIN/strait-proxy" run "${common[@]}" \
  --identity spiffe://bench.strait.local/ns/bench/sa/client \
  --outbound-listen 127.0.0.1:27140 --inbound-listen 127.0.0.1:27143 --admin-listen 127.0.0.1:27191 \
  --inbound-target 127.0.0.1:9 \
  --peer-inbound-port 26143 --destinations destinations.yaml >client.log 2>&1 & PIDS+=($!)
CLIENT_PID=$!

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

# Wait until all three paths answer (a minute: WRAP may slow the start).
for _ in $(seq 1 600); do
  ok=0
  curl -sf -H "Host: bench" http://$BACKEND/ >/dev/null && ok=$((ok+1))
  curl -sf -H "Host: bench" http://127.0.0.1:27140/ >/dev/null && ok=$((ok+1))
  curl -sf -H "Host: bench" http://127.0.0.1:28141/ >/dev/null && ok=$((ok+1))
  [ $ok = 3 ] && break
  sleep 0.1
done
[ $ok = 3 ] || { echo "not all paths answer"; cat client.log server.log haproxy-*.log; exit 1; }

