#!/usr/bin/env bash
# Runs the benchmark of BENCHMARKS.md on a Debian 12 machine with the Rust toolchain: installs
# what the harness starts or drives when missing (Varnish with varnish-modules, PostgreSQL, wrk, curl), builds the
# harness in release mode and runs every scenario at full size. The harness starts its own
# origin, Varnish nodes, PostgreSQL cluster and cachectl on 127.0.0.1 with free ports.
# Flags are passed to the harness (`--load-items 2000000`, `--no-postgres`; see --help);
# `scripts/bench.sh --tags` runs the tag-purge scenario alone (bench-results/tags.json).
# Figures: the table on stdout, and bench-results/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v varnishd >/dev/null 2>&1 || need+=(varnish)
# xkey (tag purges) in the shipped VCL: Debian's varnish-modules, built for Debian's Varnish.
ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null 2>&1 || need+=(varnish-modules)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> Installing ${need[*]} from Debian's packages"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # The packages' own services are not wanted (and there is no systemd to run them).
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "==> Machine"
nproc
free -h
lscpu | head -n 15
varnishd -V 2>&1 | head -1
wrk -v 2>&1 | head -1 || true

echo "==> cargo build --release -p cachectl-bench"
cargo build --release --locked -p cachectl-bench
target="${CARGO_TARGET_DIR:-target}"
mkdir -p bench-results
echo "==> Running the scenarios"
"$target/release/cachectl-bench" --out bench-results/results.json "$@" | tee bench-results/table.txt
