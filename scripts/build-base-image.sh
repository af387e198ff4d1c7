#!/usr/bin/env bash
# A local Python base image for the Dockerfile's PYTHON_IMAGE build argument, for machines that reach the
# Debian mirror and PyPI but no image registry:
#
#   image=$(scripts/build-base-image.sh)          # prints the image reference, e.g. localhost/convserve-python:bookworm-<key>
#   podman build --build-arg PYTHON_IMAGE="$image" -t convserve .
#
# A Debian bookworm root filesystem made with debootstrap: python3, pip and venv, `python` -> python3
# (python-is-python3), pip allowed to install system-wide (/etc/pip.conf break-system-packages), imported
# as a local image. Where pip on this machine trusts an extra CA bundle (pip's `cert` setting or PIP_CERT),
# the image's pip trusts the same bundle, so `pip install` inside a build reaches the index the same way.
#
# Cached: the tag ends in a hash of this script, the mirror and that CA bundle; an image with that tag is
# reused, so only a change to one of them builds again (a few minutes). Needs root for debootstrap.
#
# Environment: CONTAINER_ENGINE (podman, or docker; default: podman if installed), DEBIAN_MIRROR (default:
# the machine's own apt mirror, else http://deb.debian.org/debian).
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates
ENGINE=${CONTAINER_ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}

log() { echo "build-base-image: $*" >&2; }

# The machine's own Debian mirror (deb822 .sources or one-line .list), so a local or proxied mirror is used.
default_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | grep -v '^\s*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ') || true
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${DEBIAN_MIRROR:-$(default_mirror)}

# The CA bundle pip trusts here, if any (PIP_CERT wins over the config files, as in pip itself).
pip_cert() {
    local cert=${PIP_CERT:-}
    if [ -z "$cert" ]; then
        for py in python3 python; do
            if command -v "$py" >/dev/null 2>&1; then
                cert=$("$py" -m pip config get global.cert 2>/dev/null) || cert=""
                break
            fi
        done
    fi
    if [ -n "$cert" ] && [ -f "$cert" ]; then echo "$cert"; fi
}
CERT=$(pip_cert)

key=$( { cat "$0"; echo "$SUITE $PACKAGES $MIRROR"; if [ -n "$CERT" ]; then cat "$CERT"; fi; } \
       | sha256sum | cut -c1-12)
IMAGE=localhost/convserve-python:$SUITE-$key

if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    log "cached: $IMAGE"
    echo "$IMAGE"
    exit 0
fi

command -v debootstrap >/dev/null 2>&1 || { log "debootstrap is not installed"; exit 3; }
[ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
log "debootstrap $SUITE from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

{
    echo "[global]"
    echo "break-system-packages = true"
    if [ -n "$CERT" ]; then echo "cert = /etc/ssl/certs/pip-build-ca.pem"; fi
} >"$root/etc/pip.conf"
if [ -n "$CERT" ]; then cp "$CERT" "$root/etc/ssl/certs/pip-build-ca.pem"; fi
# What Docker Hub's slim images leave out: apt's caches and lists, docs (but the copyright files), man pages,
# translations; and the host's resolver and hostname, which the engine provides at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/* \
       "$root"/usr/share/locale/* "$root"/usr/share/man/* "$root"/usr/share/info/*
find "$root/usr/share/doc" -type f ! -name copyright -delete
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"

log "importing $IMAGE"
tar -C "$root" --numeric-owner -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "$IMAGE"
