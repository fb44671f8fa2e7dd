#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine with the Rust toolchain:
# installs what the tests start when missing (Varnish with varnish-modules, nginx with the cache-purge module,
# NATS with JetStream, PostgreSQL, Chromium and chromedriver, Prometheus's promtool, systemd-analyze, Baidu's bce-python-sdk and schemathesis in a virtual environment,
# cargo-deb), checks formatting and lints, then runs every test with cargo-nextest, then the Debian package's test
# (scripts/package-test.sh: dpkg -i, run, dpkg --purge), then a short run of every fuzz target (cargo-fuzz, installed when missing). Tests start their own caches, origin, PostgreSQL
# clusters and cachectl instances on 127.0.0.1 with free ports; no system service is used.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every step is announced with the time since the start (minutes:seconds), so that a CI log shows
# where the time goes.
step() { printf '==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

need=()
command -v varnishd >/dev/null 2>&1 || need+=(varnish)
# xkey (tag purges) in the shipped VCL: Debian's varnish-modules, built for Debian's Varnish.
ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null 2>&1 || need+=(varnish-modules)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
# The bus to cache-host agents: NATS with JetStream.
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
# The web console's browser tests (crates/cli/tests/e2e/console.rs): Debian's Chromium over WebDriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
[ -f /usr/lib/nginx/modules/ngx_http_cache_purge_module.so ] || need+=(libnginx-mod-http-cache-purge)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# The alert rules' and dashboard's checks (crates/cli/tests/e2e/monitoring.rs): Debian's promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The Debian package's test (scripts/package-test.sh): its units are checked offline.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
    step "Installing ${need[*]} from Debian's packages"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # The packages' own services are not wanted (and there is no systemd to run them).
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's postinst scripts may start the packaged services where an init system exists;
# the tests use their own instances on free ports, so the system ones are harmless either way.
varnishd -V 2>&1 | head -1
ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null || { echo "varnish-modules (xkey) is missing" >&2; exit 1; }
nginx -v 2>&1
nats-server --version
/usr/bin/chromium --version 2>/dev/null
command -v cargo-nextest >/dev/null 2>&1 || { step "Installing cargo-nextest"; cargo install --locked cargo-nextest; }
# The Debian package (docs/packaging.md). Built without optimization (--debug): 50 s instead of
# 84 s on 2 cores, and it packages the test binary in the same 5 s (it compresses with --fast).
command -v cargo-deb >/dev/null 2>&1 || { step "Installing cargo-deb"; cargo install --locked --debug cargo-deb; }
promtool --version 2>&1 | head -1

# Baidu's official Python SDK, which the Baidu-dialect tests drive the server with, and
# schemathesis, which fuzzes the native API against its OpenAPI document.
VENV="$PWD/.venv-tests"
if ! "$VENV/bin/python" -c 'import baidubce' >/dev/null 2>&1 || [ ! -x "$VENV/bin/schemathesis" ]; then
    step "Installing bce-python-sdk and schemathesis into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "bce-python-sdk==0.9.79" "schemathesis==4.32.5"
fi
export CACHECTL_TEST_PYTHON="$VENV/bin/python"

step "cargo fmt --check"
cargo fmt --all -- --check
# Lints in the same compilation as the tests: clippy-driver, which `cargo clippy` runs over the
# workspace's crates in check mode, compiles them fully when cargo builds with it as the
# workspace wrapper (the lints are the same; `CLIPPY_ARGS` carries `-D warnings` the way `cargo
# clippy` passes it). The dependencies are then compiled once, for the tests, instead of a
# second time in check mode for `cargo clippy`: from a clean clone on 2 cores, 9 min 50 s for
# both instead of 6 min 12 s of clippy and then 5 min 51 s of the tests' build. The
# workspace has no benches or examples, so the tests' build covers what `--all-targets` does.
# `CLIPPY_ARGS` and its separator are how cargo-clippy hands its arguments to clippy-driver, not
# a documented interface: checked with Rust 1.95 (a `clone_on_copy` put in cachectl-core failed
# the build with "implied by `-D warnings`"); recheck after a toolchain upgrade.
# Equivalent on its own: cargo clippy --workspace --all-targets --locked -- -D warnings
# Both nextest commands below run with it (without it the second would build again).
clippy_driver="$(rustc --print sysroot)/bin/clippy-driver"
[ -x "$clippy_driver" ] || { echo "clippy-driver is missing: rustup component add clippy" >&2; exit 1; }
linted=(env RUSTC_WORKSPACE_WRAPPER="$clippy_driver" CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__")
step "build the tests, linted by clippy (-D warnings)"
"${linted[@]}" cargo nextest run --workspace --locked --profile ci --no-run
# Every process the tests start (caches, PostgreSQL, the server, browsers, NATS) must be gone when
# they end, pass or fail: note which such processes run before, and fail if new ones remain after.
survivors_pattern='nginx|varnishd|cache-main|postgres|cachectl|cachectl-bench|chromium|chromedriver|nats-server'
list_survivors() { ps -eo pid=,comm= | awk -v re="^($survivors_pattern)\$" '$2 ~ re { print $1 }' | sort; }
before="$(list_survivors)"
step "tests"
status=0
"${linted[@]}" cargo nextest run --workspace --locked --profile ci "$@" || status=$?
# The Debian package, built from the binary the tests just used, installed, run and purged.
step "Debian package"
scripts/package-test.sh || status=$?
sleep 2
left="$(comm -13 <(echo "$before") <(list_survivors) | grep -v '^$' || true)"
if [ -n "$left" ]; then
    echo "==> FAILED: processes started by the tests are still running:"
    for pid in $left; do ps -o pid=,ppid=,args= -p "$pid" || true; done
    for pid in $left; do kill -9 "$pid" 2>/dev/null || true; done
    [ "$status" -ne 0 ] || status=1
else
    echo "==> no process started by the tests is left running"
fi
# A short run of every fuzz target over its committed corpus (docs/reliability.md, "Fuzzing").
step "fuzzing (10 s per target)"
scripts/fuzz.sh 10 || status=$?
step "done (status $status)"
exit "$status"
