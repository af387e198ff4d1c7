#!/usr/bin/env bash
# Debian packages the end-to-end tests use: a real Prometheus (and promtool), Chromium with its
# WebDriver for the web page, docker-compose for validating the compose file, and podman with runc
# and debootstrap for building and running the images (tests/deploy/test_containers.py;
# debootstrap makes their base image, scripts/build-base-image.sh), and PostgreSQL for the state store's
# tests (a cluster started here, with a role and database the tests use: see start_postgres below).
# Installs what is missing when run as root (or with passwordless sudo). As root it also stops and
# disables the packaged prometheus system service (the tests start their own Prometheus).
# SKIP_SYSTEM_DEPS=1 (`make test SKIP_SYSTEM_DEPS=1`) leaves the system alone: nothing is installed or stopped.
# What stays missing is named: on a developer's machine the tests that need it skip with that reason,
# and this exits 0; under CI (CI=true) nothing may be skipped, so this exits 1 (and those tests fail).
set -u
PACKAGES=(prometheus chromium chromium-driver docker-compose podman runc debootstrap postgresql wrk)
COMMANDS=(prometheus chromium chromedriver docker-compose podman runc debootstrap pg_ctlcluster wrk)
# The role and database tests/support/postgres.py connects to (CONVSERVE_TEST_POSTGRES_URL overrides it).
PG_ROLE=convserve_test
PG_PASSWORD=convserve_test
PG_DATABASE=convserve_test

find_missing() {
    missing=()
    for i in "${!PACKAGES[@]}"; do
        command -v "${COMMANDS[$i]}" >/dev/null 2>&1 || [ -x "/usr/sbin/${COMMANDS[$i]}" ] \
            || missing+=("${PACKAGES[$i]}")
    done
}

give_up() {  # $1: why the missing packages are not installed
    case "${CI:-}" in
        true|TRUE|True|1|yes)
            echo "system-deps: $1; CI=true, so this fails the run (missing: ${missing[*]})" >&2
            exit 1 ;;
    esac
    echo "system-deps: $1; tests needing ${missing[*]} will skip" >&2
    exit 0
}

start_postgres() {  # the first cluster pg_lsclusters lists, started, with the tests' role (CREATEDB) and database
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    local line version name status
    line=$(pg_lsclusters --no-header 2>/dev/null | head -n1)
    if [ -z "$line" ]; then
        version=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n1)
        [ -n "$version" ] || return 1
        $SUDO pg_createcluster "$version" main >/dev/null 2>&1 || return 1
        line=$(pg_lsclusters --no-header | head -n1)
    fi
    read -r version name _ status _ <<<"$line"
    if [ "$status" != online ]; then
        $SUDO pg_ctlcluster "$version" "$name" start >/dev/null 2>&1 || return 1
    fi
    local psql=($SUDO runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA)
    [ "$(id -u)" -eq 0 ] || psql=(sudo -n -u postgres psql -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASSWORD'" >/dev/null || return 1
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE $PG_DATABASE OWNER $PG_ROLE" >/dev/null || return 1
    fi
}

postgres_or_give_up() {
    [ "${SKIP_SYSTEM_DEPS:-0}" = 1 ] && return 0
    if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then return 0; fi
    if ! start_postgres; then
        missing=(postgresql-server)
        give_up "could not start PostgreSQL or create its test role"
    fi
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
find_missing
if [ "${SKIP_SYSTEM_DEPS:-0}" = 1 ]; then
    [ ${#missing[@]} -eq 0 ] || give_up "skipped (SKIP_SYSTEM_DEPS=1)"
    echo "system-deps: skipped (SKIP_SYSTEM_DEPS=1)" >&2
    exit 0
fi
if [ ${#missing[@]} -eq 0 ]; then postgres_or_give_up; exit 0; fi

command -v apt-get >/dev/null 2>&1 || give_up "no apt-get"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        give_up "not root and no passwordless sudo"
    fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${missing[*]}" >&2
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1
fi
# The Debian prometheus package starts a system service; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
find_missing
[ ${#missing[@]} -eq 0 ] || give_up "could not install them"
postgres_or_give_up
exit 0
