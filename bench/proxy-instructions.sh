#!/usr/bin/env bash
# Instructions per HTTP/1.1 request in each proxy of the strait pair and of
# the HAProxy pair (bench/proxy-pair.sh), counted by valgrind's callgrind:
# unlike time, a count does not move with the other tenants of a shared
# machine, so it shows what a change to the request path costs or saves.
# Each proxy runs under callgrind; after a warm-up its counters are zeroed,
# wrk sends requests for SECONDS through the pair, and the count since is
# divided by the requests wrk completed. User-space instructions only: the
# kernel's work per request (about half the CPU time here, and nearly the
# same for both pairs) is not counted.
#
#   bench/proxy-instructions.sh [SECONDS]     default 10
#
# Installs valgrind (and what bench/proxy-pair.sh needs) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
THREADS=1
command -v valgrind >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
ROOT=$PWD
WRAP="valgrind --tool=callgrind --callgrind-out-file=callgrind.%p"
source bench/proxy-pair.sh

# Instructions per request in the processes $2... for SECS of wrk on $1.
count() {
  local url=$1; shift
  wrk -t1 -c50 -d3s -H "Host: bench" "$url" >/dev/null
  for p in "$@"; do callgrind_control -z "$p" >/dev/null; done
  local n
  n=$(wrk -t1 -c50 -d"${SECS}s" -H "Host: bench" "$url" | awk '/requests in/ {print $1}')
  for p in "$@"; do callgrind_control -d "$p" >/dev/null; done
  for p in "$@"; do
    # The latest dump of $p: its summary line is the count since zeroing.
    local f
    f=$(ls -t callgrind."$p".* | head -1)
    echo "$(awk '/^summary:/ {print $2}' "$f") $n"
  done
}
per() { python3 -c "import sys; ir, n = map(int, sys.argv[1:]); print(round(ir / n))" $1; }

echo "== user-space instructions per HTTP/1.1 request, 50 connections, ${SECS}s of wrk under callgrind =="
mapfile -t S < <(count http://127.0.0.1:27140/ "$CLIENT_PID" "$SERVER_PID")
mapfile -t H < <(count http://127.0.0.1:28141/ "$HAPROXY_PID" "$HAPROXY_SERVER_PID")
SC=$(per "${S[0]}"); SS=$(per "${S[1]}"); HC=$(per "${H[0]}"); HS=$(per "${H[1]}")
printf "%-14s client side %7d   server side %7d   pair %7d   (%s requests)\n" \
  "strait pair" "$SC" "$SS" $((SC + SS)) "${S[0]#* }" \
  "haproxy pair" "$HC" "$HS" $((HC + HS)) "${H[0]#* }"
python3 -c "print('strait/haproxy = %.2f' % (($SC + $SS) / ($HC + $HS)))"
