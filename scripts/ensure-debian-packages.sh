#!/bin/sh
# Install the Debian packages tests use, when they are missing: scripts/ensure-debian-packages.sh PKG...
#
# `make test` runs it before pytest (chromium, for the HTML diagram test). Quiet when
# everything is installed; installs what is missing with apt-get when run as root. It
# always exits 0: a test that needs a package that could not be installed is skipped,
# naming it, so this script only says which ones those are.
set -u

missing() {
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || printf '%s\n' "$pkg"
    done
}

[ "$#" -gt 0 ] || { echo "usage: $0 PKG..." >&2; exit 2; }

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "ensure-debian-packages: not a Debian system; not installed: $*" \
        "(tests that need them are skipped)"
    exit 0
fi

todo=$(missing "$@")
[ -n "$todo" ] || exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-debian-packages: not installed (installing needs root and apt-get):" \
        $todo "(tests that need them are skipped)"
    exit 0
fi

apt() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q -y "$@" \
        </dev/null >/dev/null 2>&1
}
# shellcheck disable=SC2086 # one word per package
apt install --no-install-recommends $todo \
    || { apt update && apt install --no-install-recommends $todo; }

left=$(missing $todo)
if [ -n "$left" ]; then
    echo "ensure-debian-packages: could not install:" $left "(tests that need them are skipped)"
fi
exit 0
