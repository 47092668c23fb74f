# The strait pair: a backend (strait-loadgen http-server, HTTP/1.1 and
# HTTP/2) and a client and a server strait-proxy with mutual TLS between,
# for bench/proxy-pair.sh and scripts/build-proxy.sh (its training run).
# Sourced after bench/common.sh, in a scratch directory, with BIN (a directory holding `strait`
# and `strait-loadgen`), PROXY (the strait-proxy binary), THREADS, PIDS
# and, optionally, WRAP (a command prefix for the two proxies, such as
# valgrind) set. Leaves BACKEND, CLIENT_PID and SERVER_PID; the client
# proxy's outbound listener, 127.0.0.1:27140, routes `Host: bench` to the
# backend through the server proxy's inbound listener, 127.0.0.1:26143.

# Ports below the ephemeral range: the idle-connection runs leave thousands
# of client sockets (and TIME_WAITs) on ephemeral ports.
BACKEND=127.0.0.1:25080
"$BIN/strait-loadgen" http-server $BACKEND & PIDS+=($!)

"$BIN/strait" certs root >/dev/null
"$BIN/strait" certs issuer --cluster bench >/dev/null
cat > destinations.yaml <<YAML
destinations:
  - authority: "bench:80"
    endpoints:
      - { addr: "$BACKEND", identity: "spiffe://bench.strait.local/ns/bench/sa/server" }
YAML
common=(--trust-anchors root.pem --issuer-cert bench-issuer.pem --issuer-key bench-issuer.key)
STRAIT_LOG=warn STRAIT_THREADS=$THREADS ${WRAP[@]+"${WRAP[@]}"} "$PROXY" run "${common[@]}" \
  --identity spiffe://bench.strait.local/ns/bench/sa/server \
  --outbound-listen 127.0.0.1:26140 --inbound-listen 127.0.0.1:26143 --admin-listen 127.0.0.1:26191 \
  --inbound-target $BACKEND >server.log 2>&1 & PIDS+=($!)
SERVER_PID=$!
STRAIT_LOG=warn STRAIT_THREADS=$THREADS ${WRAP[@]+"${WRAP[@]}"} "$PROXY" run "${common[@]}" \
  --identity spiffe://bench.strait.local/ns/bench/sa/client \
  --outbound-listen 127.0.0.1:27140 --inbound-listen 127.0.0.1:27143 --admin-listen 127.0.0.1:27191 \
  --inbound-target 127.0.0.1:9 \
  --peer-inbound-port 26143 --destinations destinations.yaml >client.log 2>&1 & PIDS+=($!)
CLIENT_PID=$!

bench_answers http://127.0.0.1:27140/ "the strait pair" client.log server.log
