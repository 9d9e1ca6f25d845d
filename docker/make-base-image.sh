#!/usr/bin/env bash
# A Debian bookworm base image made locally, for Docker hosts that cannot pull from a registry
# (the Dockerfile's default base, python:3.11-slim, comes from Docker Hub):
#
#   docker/make-base-image.sh [TAG]          # default TAG: selfdistill-base:bookworm
#   docker build --build-arg BASE_IMAGE=selfdistill-base:bookworm -t selfdistill .
#
# debootstrap (minbase) into a temp dir, then `docker import`. An existing TAG is reused as it is;
# FORCE=1 rebuilds it. MIRROR (default: the first Debian mirror in this host's apt sources, else
# http://deb.debian.org/debian), SECURITY_MIRROR and SUITE (default bookworm: its python3 is the 3.11 the project
# needs) choose what goes in. Needs root, debootstrap and a running dockerd. Takes 1-3 minutes.
set -euo pipefail

TAG=${1:-selfdistill-base:bookworm}
SUITE=${SUITE:-bookworm}

if [[ ${FORCE:-0} != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base-image: $TAG exists; reusing it (FORCE=1 rebuilds it)"
    exit 0
fi

host_mirror() {
    # deb822 (URIs: ...) or one-line (deb URL suite ...) sources naming a Debian archive.
    grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
        | grep -oE 'https?://[^ ]+/debian/?' | grep -v -- '-security' | head -n1
}
MIRROR=${MIRROR:-$(host_mirror || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
# Security updates: SECURITY_MIRROR, else the host's, else deb.debian.org's beside the main mirror.
SECURITY_MIRROR=${SECURITY_MIRROR:-$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list.d/*.list | grep -oE 'https?://[^ ]+/debian-security/?' | head -n1 || true)}
if [[ -z $SECURITY_MIRROR && $MIRROR == *://deb.debian.org/debian ]]; then
    SECURITY_MIRROR=${MIRROR%/debian}/debian-security
fi
SECURITY_MIRROR=${SECURITY_MIRROR%/}

command -v debootstrap >/dev/null || { echo "make-base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/selfdistill-base.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
echo "make-base-image: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$ROOT/rootfs" "$MIRROR" >"$ROOT/debootstrap.log" 2>&1 \
    || { tail -n 30 "$ROOT/debootstrap.log" >&2; echo "make-base-image: debootstrap failed" >&2; exit 1; }

# What a Docker Debian image has: updates and security sources, no caches, no docs' leftovers.
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [[ -z $SECURITY_MIRROR ]] || echo "deb $SECURITY_MIRROR $SUITE-security main"
} >"$ROOT/rootfs/etc/apt/sources.list"
rm -rf "$ROOT/rootfs/var/lib/apt/lists/"* "$ROOT/rootfs/var/cache/apt/archives/"*.deb "$ROOT/rootfs/tmp/"*

tar --numeric-owner -C "$ROOT/rootfs" -c . \
    | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$TAG" >/dev/null
echo "make-base-image: built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%d MB", $1/1e6}'))"
