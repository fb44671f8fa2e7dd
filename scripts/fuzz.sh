#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ (cargo-fuzz, libFuzzer) for a short time over its committed
# corpus, and fails if any of them crashes (a panic, a failed assertion, a sanitizer report, a
# timeout or running out of memory). docs/reliability.md ("Fuzzing") has the long runs and how to repeat
# them.
#
#   scripts/fuzz.sh [SECONDS]     seconds per target (default 20, or FUZZ_SECONDS)
#
# The committed corpus is only read: what a run finds goes to a scratch directory that is removed
# afterwards. A crashing input is kept in fuzz/artifacts/<target>/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${FUZZ_SECONDS:-20}}"
case "$seconds" in
    '' | *[!0-9]* | 0) echo "seconds per target must be a positive integer, not '$seconds'" >&2; exit 2 ;;
esac

# Each step with the time since this script began (minutes:seconds).
step() { printf '==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
# Without optimization (--debug): it only drives cargo and libFuzzer; 42 s to install instead of 62 s.
command -v cargo-fuzz >/dev/null 2>&1 || { step "Installing cargo-fuzz"; cargo install --locked --debug cargo-fuzz; }
# cargo-fuzz passes the sanitizer and coverage flags with -Z, which the stable toolchain accepts
# only with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1

# Without the address sanitizer and with debug assertions and overflow checks (-s none -a), as
# the long runs: the crates under test have no `unsafe` code, and overflow checks find what the
# sanitizer would not (docs/reliability.md, "Fuzzing"). The build takes half the time.
flags=(-s none -a)
step "cargo fuzz build ${flags[*]} (all targets)"
cargo fuzz build "${flags[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in $(cargo fuzz list); do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus" "$scratch/$target"
    step "$target: ${seconds}s over $(find "$corpus" -type f | wc -l) corpus inputs"
    # The first directory receives new inputs; the committed corpus is only read.
    if ! cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" "$corpus" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log" >&2
        failed+=("$target")
        continue
    fi
    grep -E '^stat::number_of_executed_units|^Done ' "$scratch/$target.log" || true
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
step "every fuzz target ran ${seconds}s without a crash"
