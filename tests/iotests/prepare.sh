#!/usr/bin/env bash
# Prepare qemu's own test suite (tests/qemu-iotests of Debian's qemu source package, the version of the
# installed qemu-utils) under var/iotests, so that tests/iotests/runner.py can run `./check` with any
# qemu-img and qemu-nbd. Idempotent: a prepared tree is only checked.
#
#   var/iotests/src/        the unpacked source package (Debian's patches applied; only tests/qemu-iotests
#                           and python/ are used); cached across runs, replaced when qemu-utils changes
#   var/iotests/bin/        qemu-system-x86_64 (see below)
#
# Needs root (or sudo) the first time, for apt: qemu-system-x86 (the harness starts qemu-system-x86_64 and
# qemu-storage-daemon), dpkg-dev (dpkg-source) and a deb-src entry for the mirror apt already uses.
# Environment: NBDSRV_IOTESTS_DIR overrides var/iotests.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${NBDSRV_IOTESTS_DIR:-$ROOT/var/iotests}
LOG="$DIR/prepare.log"
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$DIR"
: >"$LOG"

say() { echo "iotests: $*" >&2; }
die() { say "error: $*"; say "details in $LOG"; exit 1; }
quiet() { echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then quiet "$@"
    elif command -v sudo >/dev/null; then quiet sudo "$@"
    else echo "+ $* (needs root)" >>"$LOG"; return 1
    fi
}
installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | cut -c1-2)" = ii ]; }

# --- 1. packages: the real tools (the baseline), the system emulator the harness needs, dpkg-source -----------
need=()
for p in qemu-utils qemu-system-x86 dpkg-dev; do installed "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
    say "installing Debian packages: ${need[*]}"
    as_root apt-get update -q || die "apt-get update failed"
    as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" ||
        die "apt-get install ${need[*]} failed"
fi

# --- 2. the source package of the installed qemu-utils ----------------------------------------------------------
# binNMU suffixes (+b3) are not part of the source version
version=$(dpkg-query -W -f='${Version}' qemu-utils | sed 's/+b[0-9]*$//')
stamp="$DIR/src/.nbdsrv-source-version"
if [ ! -d "$DIR/src/tests/qemu-iotests" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$version" ]; then
    if [ -z "$(apt-cache showsrc qemu 2>/dev/null)" ]; then
        # a deb-src twin of every deb entry apt already uses (same mirrors, suites and keys)
        src=/etc/apt/sources.list.d/nbdsrv-iotests-src.sources
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$DIR/src.sources"
        else
            . /etc/os-release
            printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\n' \
                "${VERSION_CODENAME:-bookworm}" >"$DIR/src.sources"
        fi
        say "adding deb-src entries in $src"
        as_root cp "$DIR/src.sources" "$src" || die "could not write $src"
        as_root apt-get update -q || die "apt-get update failed"
    fi
    say "fetching the qemu $version source package into $DIR/src"
    dl="$DIR/download"
    rm -rf "$dl" "$DIR/src.new"
    mkdir -p "$dl"
    chmod 777 "$dl"   # apt drops privileges to _apt for downloads
    (cd "$dl" && quiet apt-get source --download-only "qemu=$version") || die "apt-get source qemu=$version failed"
    # dpkg-source applies Debian's patches, several of which touch the iotests
    (cd "$dl" && quiet dpkg-source -x qemu_*.dsc "$DIR/src.new") || die "dpkg-source -x failed"
    rm -rf "$DIR/src" "$dl" "$DIR"/qemu_*.orig.tar.* "$DIR"/qemu_*.debian.tar.* "$DIR"/qemu_*.dsc
    mv "$DIR/src.new" "$DIR/src"
    echo "$version" >"$stamp"
fi

# --- 3. qemu-system-x86_64 as the harness wants it ---------------------------------------------------------------
# The harness starts the emulator with "-accel qtest"; Debian builds 7.2 without the qtest accelerator (the
# -qtest chardev is there), so a wrapper swaps that one accelerator for tcg.
mkdir -p "$DIR/bin"
cat >"$DIR/bin/qemu-system-x86_64.new" <<'W'
#!/bin/bash
args=()
prev=
for a in "$@"; do
    if [ "$prev" = "-accel" ] && [ "$a" = "qtest" ]; then a=tcg; fi
    args+=("$a")
    prev=$a
done
exec /usr/bin/qemu-system-x86_64 "${args[@]}"
W
chmod +x "$DIR/bin/qemu-system-x86_64.new"
mv "$DIR/bin/qemu-system-x86_64.new" "$DIR/bin/qemu-system-x86_64"
exit 0
