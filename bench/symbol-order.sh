#!/usr/bin/env bash
# Regenerates proxy/symbol-order.txt: the strait-proxy functions a sidecar
# runs (start-up, HTTP/1.1 and HTTP/2 through the pair, the admin
# endpoints), hottest first. proxy/build.rs hands the file to the linker
# (lld's --symbol-ordering-file), which lays those functions out together at
# the start of the executable's text: the pages a running proxy touches
# are then few and adjacent, instead of spread over all of it, so fewer
# are read and mapped (idle RSS, bench/proxy.sh) and the hot path is
# denser in the instruction cache.
#
# The names are mangled symbols of the binary scripts/build-proxy.sh makes
# (the one the image ships), of this toolchain and dependency set. A build
# that does not name its target (`--target`) hashes every symbol
# differently, and is laid out by nothing but the linker's defaults. A
# new compiler or dependency version renames many, and a changed function
# may be renamed. Missing names are skipped, so a stale file only orders
# less; run this again after such changes (bench/proxy.sh shows the RSS).
#
#   bench/symbol-order.sh [SECONDS]     default 3 (of each kind of traffic)
#
# Runs both proxies of bench/proxy-pair.sh under valgrind's callgrind
# (installed if missing), which records every function that runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-3}
THREADS=1
source bench/common.sh
bench_tools valgrind:valgrind python3:python3
ROOT=$PWD
WRAP="valgrind --tool=callgrind --demangle=no --callgrind-out-file=callgrind.%p"
source bench/proxy-pair.sh

for port in 27140 27191 26191; do
  curl -sf -H "Host: bench" "http://127.0.0.1:$port/" >/dev/null || true
done
for path in metrics ready live; do
  curl -sf "http://127.0.0.1:27191/$path" >/dev/null
  curl -sf "http://127.0.0.1:26191/$path" >/dev/null
done
wrk -t1 -c50 -d"${SECS}s" -H "Host: bench" http://127.0.0.1:27140/ >/dev/null
h2load -c10 -m10 -t1 -D "$SECS" -H ":authority: bench" http://127.0.0.1:27140/ >/dev/null
# Stopped gracefully (SIGTERM), each writes its whole profile.
kill "$CLIENT_PID" "$SERVER_PID"
while kill -0 "$CLIENT_PID" 2>/dev/null || kill -0 "$SERVER_PID" 2>/dev/null; do sleep 0.2; done

# Exclusive cost per function of the strait-proxy object, both proxies
# summed; every function that ran, hottest first.
python3 - "$PROXY" callgrind.* > "$ROOT/proxy/symbol-order.txt" <<'PY'
import collections, re, sys
exe, files = sys.argv[1], sys.argv[2:]
cost = collections.Counter()
for path in files:
    names = collections.defaultdict(dict)
    ob = fn = None
    mine = False
    in_call = False
    for line in open(path, errors="replace"):
        m = re.match(r"(ob|fn|cob|cfn|fl|fi|fe|cfi|cfl)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, ident, name = m.groups()
            table = names["ob" if kind in ("ob", "cob") else "fn" if kind in ("fn", "cfn") else "fl"]
            if name is not None:
                table[ident] = name.strip()
            if kind == "ob":
                mine = table.get(ident) == exe
            elif kind == "fn":
                fn = table.get(ident)
                # A recursive call's frames are named `f'2`...: credit f.
                fn = re.sub(r"'\d+$", "", fn) if fn else fn
            continue
        if line.startswith("calls="):
            in_call = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if in_call:
                in_call = False  # the cost of the call, not this function's
                continue
            parts = line.split()
            if mine and fn and len(parts) >= 2:
                cost[fn] += int(parts[1])
for name, c in sorted(cost.items(), key=lambda kv: (-kv[1], kv[0])):
    # Not symbols: callgrind's names for code it has no symbol for.
    if c > 0 and not name.startswith(("0x", "(")):
        print(name)
PY
echo "proxy/symbol-order.txt: $(wc -l < "$ROOT/proxy/symbol-order.txt") functions"
