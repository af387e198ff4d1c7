#!/usr/bin/env bash
# Debian packages the end-to-end tests use: a real Prometheus (and promtool), Chromium with its
# WebDriver for the web page, docker-compose for validating the compose file, and podman with runc
# and debootstrap for building and running the images (tests/deploy/test_containers.py;
# debootstrap makes their base image, scripts/build-base-image.sh).
# Installs what is missing when run as root (or with passwordless sudo); otherwise says what is
# missing, and the tests that need it skip with that reason. As root it also stops and disables the
# packaged prometheus system service (the tests start their own Prometheus).
# SKIP_SYSTEM_DEPS=1 (`make test SKIP_SYSTEM_DEPS=1`) leaves the system alone: nothing is installed or stopped.
set -u
if [ "${SKIP_SYSTEM_DEPS:-0}" = 1 ]; then
    echo "system-deps: skipped (SKIP_SYSTEM_DEPS=1); tests needing missing packages will skip" >&2
    exit 0
fi
PACKAGES=(prometheus chromium chromium-driver docker-compose podman runc debootstrap)
COMMANDS=(prometheus chromium chromedriver docker-compose podman runc debootstrap)

missing=()
for i in "${!PACKAGES[@]}"; do
    command -v "${COMMANDS[$i]}" >/dev/null 2>&1 || [ -x "/usr/sbin/${COMMANDS[$i]}" ] || missing+=("${PACKAGES[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get; tests needing ${missing[*]} will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "system-deps: not root; install ${missing[*]} to run every test" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${missing[*]}" >&2
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || echo "system-deps: could not install ${missing[*]}; tests needing them will skip" >&2
fi
# The Debian prometheus package starts a system service; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
exit 0
