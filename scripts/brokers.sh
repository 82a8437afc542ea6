#!/usr/bin/env bash
# Debian roots carrying newer RabbitMQ releases, for the test suite's private nodes.
#
#   scripts/brokers.sh build [VERSION...]   build the missing roots (default: 4.0 4.3)
#   scripts/brokers.sh path VERSION         print the root of VERSION (built or not)
#   scripts/brokers.sh clean                stop nodes a killed test run left running in the
#                                           roots, delete their folders, unmount /proc
#
# 4.0 is Debian trixie's rabbitmq-server (4.0.5), 4.3 forky's (4.3.6); 3.10 is the host's own
# and needs no root. Roots live outside the repository, in $WORKERKIT_BROKER_ROOTS (default
# /var/cache/workerkit-brokers/<suite>). A root is built in a temporary folder next to its final
# place and renamed only once complete, under a lock, so an interrupted or concurrent build never
# leaves a half root behind. Any failure exits non-zero with the reason: never a silent skip.
set -euo pipefail

ROOTS=${WORKERKIT_BROKER_ROOTS:-/var/cache/workerkit-brokers}
MARK=.workerkit-root  # written last: a root without it is not a root

suite_of() {
    case "$1" in
        4.0) echo trixie ;;
        4.3) echo forky ;;
        *) echo "unknown broker version '$1' (known: 4.0, 4.3; 3.10 is the host's)" >&2; exit 2 ;;
    esac
}

# The Debian mirror apt already uses (deb822 "URIs:" or one-line "deb URL suite ..." entries).
mirror() {
    local url
    url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | sed -n -E 's/^\s*(URIs:|deb(\s+\[[^]]*\])?)\s+(\S+).*/\3/p' \
        | grep -v -- '-security' | head -n 1 || true)
    echo "${url:-http://deb.debian.org/debian}"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return
    echo "installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap </dev/null
}

# bookworm's debootstrap has no script for forky: sid's works for any testing suite.
script_for() {
    local dir=/usr/share/debootstrap/scripts
    if [ -e "$dir/$1" ]; then echo "$dir/$1"; else echo "$dir/sid"; fi
}

# Unmount whatever a killed debootstrap left mounted under $1, so that rm -rf cannot fail.
unmount_under() {
    local target
    target=$(realpath -m "$1")
    awk -v t="$target/" 'index($2"/", t) == 1 {print $2}' /proc/self/mounts | sort -r \
        | while read -r mnt; do umount -l "$mnt" || true; done
}

build() {
    local version=$1 suite root tmp
    suite=$(suite_of "$version")
    root="$ROOTS/$suite"
    [ -e "$root/$MARK" ] && { echo "$root"; return; }
    mkdir -p "$ROOTS"
    exec 9>"$ROOTS/.$suite.lock"
    flock 9
    if [ -e "$root/$MARK" ]; then echo "$root"; exec 9>&-; return; fi  # built while we waited
    ensure_debootstrap
    # Leftovers of an interrupted build (ours, under the lock): unmount, then delete.
    for tmp in "$ROOTS/.$suite".build.*; do
        [ -e "$tmp" ] || continue
        unmount_under "$tmp"
        rm -rf "$tmp"
    done
    tmp=$(mktemp -d "$ROOTS/.$suite.build.XXXXXX")
    chmod 755 "$tmp"  # mktemp makes it 0700: the node's rabbitmq user must get in
    echo "building $root (rabbitmq-server from Debian $suite, mirror $(mirror))" >&2
    if ! debootstrap --variant=minbase --include=rabbitmq-server "$suite" "$tmp" "$(mirror)" \
        "$(script_for "$suite")" >"$tmp.log" 2>&1; then
        tail -n 30 "$tmp.log" >&2
        unmount_under "$tmp"
        echo "debootstrap of $suite failed (full log: $tmp.log)" >&2
        exit 1
    fi
    unmount_under "$tmp"
    [ -x "$tmp/usr/sbin/rabbitmq-server" ] || { echo "no rabbitmq-server in the $suite root" >&2; exit 1; }
    cp /etc/hosts "$tmp/etc/hosts"  # without it the node dies with nxdomain on "localhost"
    chroot "$tmp" dpkg-query -W -f='${Version}\n' rabbitmq-server >"$tmp/$MARK"
    [ -e "$root" ] && { unmount_under "$root"; rm -rf "$root"; }  # an unmarked (broken) root
    mv "$tmp" "$root"
    rm -f "$tmp.log"
    exec 9>&-
    echo "built $root: rabbitmq-server $(cat "$root/$MARK")" >&2
    echo "$root"
}

# Only processes chrooted into one of our roots are touched: they were started by the test
# fixtures (tests/reliability/broker.py), never by anyone else.
clean() {
    local root pid
    for root in "$ROOTS"/*/; do
        root=$(realpath "$root")
        [ -e "$root/$MARK" ] || continue
        for pid in $(ls /proc | grep -E '^[0-9]+$'); do
            [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] || continue
            echo "stopping pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-60)) in $root" >&2
            kill -9 "$pid" 2>/dev/null || true
        done
        rm -rf "$root/var/lib/workerkit-nodes"/*
        unmount_under "$root/proc"
    done
}

case "${1:-}" in
    build)
        shift
        [ $# -gt 0 ] || set -- 4.0 4.3
        for version in "$@"; do
            [ "$version" = 3.10 ] && continue
            build "$version" >/dev/null
        done
        ;;
    path) echo "$ROOTS/$(suite_of "${2:?version}")" ;;
    clean) clean ;;
    *) echo "usage: $0 build [4.0|4.3 ...] | path VERSION | clean" >&2; exit 2 ;;
esac
