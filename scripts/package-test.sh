#!/usr/bin/env bash
# The Debian package's test (docs/packaging.md): builds the .deb with cargo-deb from a binary that
# is already built (no second compilation of the workspace), installs it on this machine with
# `dpkg -i`, checks the installed files, the maintainer scripts' work and the systemd units
# (`systemd-analyze verify` and an offline `systemd-analyze security`: no systemd runs here),
# starts the installed /usr/bin/cachectl as the package's user against the installed
# configuration (listen address and store overridden to 127.0.0.1, a free port and a temporary
# directory through CACHECTL_ environment variables), checks that it answers, stops it, and
# purges the package — also when a check fails (trap), leaving nothing behind.
#
#   scripts/package-test.sh             package target/debug/cachectl (what the test run built)
#   scripts/package-test.sh --release   package target/release/cachectl (cargo build --release first)
#
# Needs root (re-runs itself with sudo otherwise), cargo-deb (`cargo install --locked cargo-deb`), systemd-analyze, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# dpkg, the package's user and setpriv need root: run the whole script as root.
if [ "$(id -u)" -ne 0 ]; then
    exec sudo --preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME,CARGO_TARGET_DIR "$0" "$@"
fi

profile=dev
[ "${1:-}" = "--release" ] && profile=release

command -v cargo-deb >/dev/null 2>&1 || { echo "cargo-deb is missing: cargo install --locked cargo-deb" >&2; exit 1; }
command -v systemd-analyze >/dev/null 2>&1 || { echo "systemd-analyze is missing (Debian's systemd package)" >&2; exit 1; }
command -v curl >/dev/null 2>&1 || { echo "curl is missing" >&2; exit 1; }
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin_dir="$target_dir/$([ "$profile" = dev ] && echo debug || echo release)"
[ -x "$bin_dir/cachectl" ] || { echo "$bin_dir/cachectl is not built (cargo build -p cachectl$([ "$profile" = release ] && echo ' --release'))" >&2; exit 1; }
if dpkg-query -W -f '${Status}' cachectl 2>/dev/null | grep -q 'installed'; then
    echo "a cachectl package is installed on this machine already; not touching it" >&2
    exit 1
fi

fail() { echo "FAILED: $*" >&2; exit 1; }
check() { echo "  ok: $*"; }

tmp="$(mktemp -d /tmp/cachectl-package-test.XXXXXX)"
chmod 755 "$tmp"
user_existed=0
getent passwd cachectl >/dev/null && user_existed=1
policy_rc=0
server_pid=""

cleanup() {
    local rc=$?
    set +e
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null
        wait "$server_pid" 2>/dev/null
    fi
    if dpkg-query -W -f '${Status}' cachectl 2>/dev/null | grep -q 'installed\|config-files\|half'; then
        dpkg --purge cachectl >/dev/null 2>&1
    fi
    [ "$policy_rc" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$user_existed" -eq 0 ] && getent passwd cachectl >/dev/null && userdel cachectl 2>/dev/null
    getent group cachectl >/dev/null && [ "$user_existed" -eq 0 ] && groupdel cachectl 2>/dev/null
    rm -rf "$tmp"
    if [ "$rc" -ne 0 ]; then
        [ -f "$tmp.log" ] && { echo "--- the installed server's log:"; cat "$tmp.log"; }
        echo "==> package test FAILED (everything it installed is removed)" >&2
    fi
    rm -f "$tmp.log"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> cargo deb -p cachectl --no-build ($profile binary: $bin_dir/cachectl)"
start=$(date +%s)
if [ "$profile" = dev ]; then
    # cargo-deb packages `target/release/…` of the target directory it is given, and does not
    # package the dev profile: hand it a directory whose release/ holds the dev binary (a hard
    # link, or a copy across file systems), so that nothing is compiled again.
    mkdir -p "$tmp/target/release"
    ln "$bin_dir/cachectl" "$tmp/target/release/cachectl" 2>/dev/null || cp "$bin_dir/cachectl" "$tmp/target/release/cachectl"
    CARGO_TARGET_DIR="$tmp/target" cargo deb -p cachectl --no-build --fast -o "$tmp/" >"$tmp/cargo-deb.log" 2>&1 ||
        { cat "$tmp/cargo-deb.log"; fail "cargo deb"; }
else
    cargo deb -p cachectl --no-build -o "$tmp/" >"$tmp/cargo-deb.log" 2>&1 || { cat "$tmp/cargo-deb.log"; fail "cargo deb"; }
fi
deb="$(ls "$tmp"/cachectl_*.deb)"
echo "  built $(basename "$deb") ($(du -h "$deb" | cut -f1)) in $(($(date +%s) - start)) s"

echo "==> the package's metadata"
info="$(dpkg-deb --info "$deb")"
grep -q '^ Package: cachectl$' <<<"$info" || fail "package name"
conffiles="$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)"
[ "$conffiles" = "/etc/cachectl/cachectl.toml" ] || fail "conffiles: $conffiles"
check "/etc/cachectl/cachectl.toml is the one conffile"
contents="$(dpkg-deb --contents "$deb" | awk '{print $6}')"
for f in ./usr/bin/cachectl ./etc/cachectl/cachectl.toml ./usr/lib/systemd/system/cachectl.service \
    ./usr/lib/systemd/system/cachectl-agent.service ./usr/share/doc/cachectl/examples/agent.toml; do
    grep -qx "$f" <<<"$contents" || fail "$f is not in the package"
done
check "binary, configuration, both units and the agent's example are in the package"
for script in postinst prerm postrm; do
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO "./$script" >"$tmp/$script" || fail "no $script"
done
grep -q 'deb-systemd-helper enable' "$tmp/postinst" || fail "postinst does not enable cachectl.service"
grep -q 'useradd --system' "$tmp/postinst" || fail "postinst does not create the user"
# cargo-deb replaces every #DEBHELPER# marker: the unit snippets must come after the user exists.
first_user=$(grep -n 'useradd --system' "$tmp/postinst" | head -1 | cut -d: -f1)
first_unit=$(grep -n 'deb-systemd-' "$tmp/postinst" | head -1 | cut -d: -f1)
[ "$first_user" -lt "$first_unit" ] || fail "postinst enables or starts the units before creating their user"
check "maintainer scripts: user, key file, systemd enable (cargo-deb's snippets)"

echo "==> dpkg -i"
# Where systemd runs, the postinst would start cachectl.service on its configured address: deny
# service starts for this test (policy-rc.d), as image builds do.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | tee /usr/sbin/policy-rc.d >/dev/null
    chmod 755 /usr/sbin/policy-rc.d
    policy_rc=1
fi
start=$(date +%s)
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg -i"; }
echo "  installed in $(($(date +%s) - start)) s"
[ "$(dpkg-query -W -f '${Status}' cachectl)" = "install ok installed" ] || fail "dpkg status"
[ -x /usr/bin/cachectl ] || fail "/usr/bin/cachectl"
/usr/bin/cachectl --version | grep -q '^cachectl ' || fail "cachectl --version"
check "/usr/bin/cachectl runs: $(/usr/bin/cachectl --version)"
getent passwd cachectl | grep -q ':/var/lib/cachectl:/usr/sbin/nologin$' || fail "the cachectl system user"
check "system user cachectl (home /var/lib/cachectl, no login shell)"
[ "$(stat -c '%a %U %G' /etc/cachectl/cachectl.toml)" = "640 root cachectl" ] ||
    fail "/etc/cachectl/cachectl.toml is $(stat -c '%a %U %G' /etc/cachectl/cachectl.toml)"
cmp -s /etc/cachectl/cachectl.toml "$ROOT/deploy/debian/cachectl.toml" || fail "the installed configuration differs"
check "/etc/cachectl/cachectl.toml: 0640 root:cachectl, as shipped"
[ "$(stat -c '%a %U %G' /etc/cachectl/secret.key)" = "640 root cachectl" ] ||
    fail "/etc/cachectl/secret.key is $(stat -c '%a %U %G' /etc/cachectl/secret.key)"
[ "$(base64 -d /etc/cachectl/secret.key | wc -c)" -eq 32 ] || fail "secret.key is not 32 bytes in base64"
check "/etc/cachectl/secret.key: 32 random bytes in base64, 0640 root:cachectl"
key_before="$(sha256sum /etc/cachectl/secret.key)"
dpkg-reconfigure cachectl >/dev/null 2>&1 || env DPKG_MAINTSCRIPT_NAME=postinst /var/lib/dpkg/info/cachectl.postinst configure >/dev/null
[ "$(sha256sum /etc/cachectl/secret.key)" = "$key_before" ] || fail "postinst replaced an existing secret.key"
check "postinst run again keeps the existing key"
[ -L /etc/systemd/system/multi-user.target.wants/cachectl.service ] || fail "cachectl.service is not enabled"
[ ! -e /etc/systemd/system/multi-user.target.wants/cachectl-agent.service ] || fail "cachectl-agent.service is enabled"
check "cachectl.service enabled, cachectl-agent.service not"

echo "==> systemd-analyze (offline: no systemd runs here)"
for unit in cachectl.service cachectl-agent.service; do
    out="$(systemd-analyze verify "/usr/lib/systemd/system/$unit" 2>&1)" || { echo "$out"; fail "systemd-analyze verify $unit"; }
    # Only warnings about our units matter; the host's other units are not ours to judge.
    if grep -i "cachectl" <<<"$out"; then fail "systemd-analyze verify $unit warns"; fi
    check "systemd-analyze verify $unit"
    score="$(systemd-analyze security --offline=true --no-pager "/usr/lib/systemd/system/$unit" 2>&1 |
        sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')"
    [ -n "$score" ] || fail "systemd-analyze security $unit gave no score"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "$unit: exposure $score > 2.0"
    check "systemd-analyze security $unit: exposure $score (OK is <= 2.0 on its scale)"
done
grep -q '^ProtectSystem=strict$' /usr/lib/systemd/system/cachectl.service || fail "ProtectSystem=strict"
grep -q '^StateDirectory=cachectl$' /usr/lib/systemd/system/cachectl.service || fail "StateDirectory=cachectl"
grep -q '^NoNewPrivileges=yes$' /usr/lib/systemd/system/cachectl.service || fail "NoNewPrivileges"

echo "==> the installed binary against the installed configuration, as the service user"
runuser -u cachectl -- /usr/bin/cachectl check-config --config /etc/cachectl/cachectl.toml >/dev/null ||
    fail "cachectl check-config as user cachectl"
check "cachectl check-config --config /etc/cachectl/cachectl.toml (as cachectl)"
state="$tmp/state"
mkdir "$state"
chown cachectl:cachectl "$state"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# As the unit runs it: its user and group (setpriv execs, so that the signals reach cachectl
# itself), its open-file limit (LimitNOFILE=65536, or the hard limit if lower), the overrides.
(
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    exec setpriv --reuid=cachectl --regid=cachectl --init-groups -- env CACHECTL_SERVER__LISTEN="127.0.0.1:$port" \
        CACHECTL_STORE__URL="sqlite://$state/cachectl.db" CACHECTL_LOG=info \
        /usr/bin/cachectl serve --config /etc/cachectl/cachectl.toml
) >"$tmp.log" 2>&1 &
server_pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 200); do
    curl -fsS --noproxy '*' "$base/healthz" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || fail "the installed cachectl exited"
    sleep 0.1
done
curl -fsS --noproxy '*' "$base/healthz" | grep -qx ok || fail "/healthz"
curl -fsS --noproxy '*' "$base/readyz" | grep -qx ready || fail "/readyz"
check "/healthz and /readyz answer on 127.0.0.1:$port"
# The packaged account's token works: the accounts of the installed file were loaded.
answer="$(curl -sS --noproxy '*' "$base/v2/cache/refresh?token=acme-secret-token&task_id=1")"
grep -q '"code":0' <<<"$answer" || fail "a query with the packaged token: $answer"
metrics="$(curl -fsS --noproxy '*' "$base/metrics")"
grep -q '^cachectl_http_requests_total{dialect="baishan",status="200"} 1$' <<<"$metrics" || fail "/metrics: $metrics"
grep -q '^cachectl_queue_items{state="waiting"} 0$' <<<"$metrics" || fail "/metrics queue: $metrics"
check "the packaged account answers; /metrics counts the request"
[ -f "$state/cachectl.db" ] || fail "the store was not created in the overridden directory"
[ "$(stat -c %U "$state/cachectl.db")" = cachectl ] || fail "the store is not the service user's"
check "the store is $state/cachectl.db, owned by cachectl"
kill -TERM "$server_pid"
for _ in $(seq 1 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server_pid" 2>/dev/null && fail "cachectl did not stop on SIGTERM"
exit_status=0
wait "$server_pid" || exit_status=$?
[ "$exit_status" -eq 0 ] || fail "cachectl exited with $exit_status on SIGTERM"
server_pid=""
check "stopped by SIGTERM, exit status 0"

echo "==> dpkg --purge"
dpkg --purge cachectl >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg --purge"; }
dpkg-query -W -f '${Status}' cachectl >/dev/null 2>&1 && fail "dpkg still knows cachectl"
for f in /usr/bin/cachectl /etc/cachectl /var/lib/cachectl /usr/lib/systemd/system/cachectl.service \
    /usr/lib/systemd/system/cachectl-agent.service /etc/systemd/system/multi-user.target.wants/cachectl.service \
    /usr/share/doc/cachectl /etc/systemd/system/cachectl.service /etc/systemd/system/cachectl-agent.service; do
    if [ -e "$f" ] || [ -L "$f" ]; then fail "$f is left after the purge"; fi
done
left_state="$(find /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked \
    -name '*cachectl*' 2>/dev/null; grep -rls 'cachectl' /var/lib/systemd/deb-systemd-helper-enabled 2>/dev/null || true)"
[ -z "$left_state" ] || fail "deb-systemd-helper still records a cachectl unit: $left_state"
check "nothing of the package is left (the cachectl user is kept by Debian practice; this test removes it if it created it)"
echo "==> package test passed"
