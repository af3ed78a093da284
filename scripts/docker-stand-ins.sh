#!/usr/bin/env bash
# Local stand-in base images for machines that cannot pull from an image registry.
#
# Builds, from Debian's package mirror only (debootstrap + apt in a chroot, then `docker import`):
#   python:3.11.14-slim-bookworm   the FROM of every project Dockerfile: Debian bookworm's own
#                                  Python 3.11 (python3, venv, pip installed by ensurepip so that
#                                  the Dockerfiles' `pip install` / `pip uninstall` behave as in the
#                                  official image). Tagged with the official name so the production
#                                  Dockerfiles build unchanged.
#   dandelion-rehearsal/services   base of the rehearsal-only stand-ins for the third-party
#                                  images of compose.yaml: PostgreSQL 15 and Prometheus (Debian
#                                  packages) + Python (moto S3 server, statsd receiver).
# A tag that already exists is kept (delete it to rebuild). Root filesystems are cached as
# tarballs under $DANDELION_DOCKER_CACHE (default: ~/.cache/dandelion/docker, shared by checkouts).
# Usage: scripts/docker-stand-ins.sh            (needs root, debootstrap and a running dockerd)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${DANDELION_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dandelion/docker}"
MIRROR="${DANDELION_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON_TAG="python:3.11.14-slim-bookworm"
SERVICES_TAG="dandelion-rehearsal/services:bookworm"
mkdir -p "$CACHE"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

chroot_apt() {  # ROOTFS PACKAGES...
    local root="$1"; shift
    mount --bind /proc "$root/proc"
    trap 'umount "$root/proc" 2>/dev/null || true' RETURN
    chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get install -y -q \
        --no-install-recommends "$@" >/dev/null
    chroot "$root" apt-get clean
    rm -rf "$root/var/lib/apt/lists/"*
}

minbase() {  # ROOTFS: a fresh minbase bookworm (cached as a tarball)
    local root="$1" tarball="$CACHE/bookworm-minbase.tar"
    if [[ ! -f "$tarball" ]]; then
        local tmp; tmp="$(mktemp -d)"
        debootstrap --variant=minbase bookworm "$tmp" "$MIRROR" >/dev/null
        tar -C "$tmp" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        rm -rf "$tmp"
    fi
    mkdir -p "$root" && tar -C "$root" -xf "$tarball"
    # The chroot's apt needs fresh lists (the tarball keeps none after a clean).
    chroot "$root" apt-get update -q >/dev/null
}

import_rootfs() {  # ROOTFS TAG ENV...
    local root="$1" tag="$2"; shift 2
    local changes=()
    for e in "$@"; do changes+=(--change "ENV $e"); done
    rm -rf "$root/var/cache/apt/"* "$root/var/log/"*.log "$root/tmp/"*
    tar -C "$root" -c . | docker import "${changes[@]}" --change 'CMD ["bash"]' - "$tag" >/dev/null
}

build_python() {
    local root; root="$(mktemp -d)"
    minbase "$root"
    chroot_apt "$root" python3 python3-venv python-is-python3 ca-certificates
    # As in the official image: a pip installed by pip (so `pip uninstall` works), no PEP 668
    # marker. Debian disables ensurepip; its bundled pip wheel installs itself instead.
    rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
    # shellcheck disable=SC2016  # expanded by the chroot's shell
    chroot "$root" sh -c 'w=$(ls /usr/share/python-wheels/pip-*.whl) && \
        python3 "$w/pip" install -q --no-index --no-cache-dir "$w"' >/dev/null 2>&1
    import_rootfs "$root" "$PYTHON_TAG" "LANG=C.UTF-8" \
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    rm -rf "$root"
}

build_services() {
    local root; root="$(mktemp -d)"
    minbase "$root"
    chroot_apt "$root" python3 python3-venv python-is-python3 postgresql-15 postgresql-client-15 \
        prometheus ca-certificates
    import_rootfs "$root" "$SERVICES_TAG" "LANG=C.UTF-8" \
        "PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    rm -rf "$root"
}

have_image "$PYTHON_TAG" || { echo "building stand-in $PYTHON_TAG"; build_python; }
if [[ "${1:-}" != "--python-only" ]]; then
    have_image "$SERVICES_TAG" || { echo "building stand-in $SERVICES_TAG"; build_services; }
fi
