#!/usr/bin/env bash
# Samples the harness's server process with perf during one phase, as done for BENCHMARKS.md's
# "profile findings". Hardware counters are often missing in VMs, so it samples the CPU clock.
# usage: crates/bench/scripts/profile.sh PHASE_REGEX SECONDS OUT.perf -- HARNESS_FLAGS...
#   e.g. profile.sh "scenario 1" 8 /tmp/fanout.perf -- --fanout-urls 60000 --load-items 100000 --no-postgres
#        profile.sh "querying" 16 /tmp/query.perf -- --load-items 1000000 --query-seconds 5 --no-postgres
# then:  perf report -i OUT.perf --children --sort symbol --stdio -g none | grep -E 'cachectl_|sqlx|serde_json'
set -u
phase="$1"; secs="$2"; out="$3"; shift 4
target="${CARGO_TARGET_DIR:-target}"
exe="$target/release/cachectl-bench"
log="$(mktemp)"
"$exe" --out "$(mktemp)" "$@" > "$log.table" 2> "$log" &
harness=$!
while ! grep -qE "$phase" "$log"; do
    sleep 0.1
    kill -0 "$harness" 2>/dev/null || { cat "$log"; exit 1; }
done
sleep 0.3
server=$(pgrep -n -f "cachectl-bench serve")
echo "profiling server pid $server for $secs s"
perf record -e cpu-clock -F 499 -g --call-graph dwarf,16384 -p "$server" -o "$out" -- sleep "$secs"
wait "$harness"
cat "$log.table"
