#!/usr/bin/env bash
# Download every wheel the images install (requirements.lock, for the images' platform) plus the
# build tools the Dockerfiles use (uv, setuptools), into a wheelhouse folder, so that image builds
# can run offline: `nox -s images` serves the folder on loopback and passes it to the builds as
# PIP_FIND_LINKS / UV_FIND_LINKS with the index switched off. Downloads only what is missing.
# Usage: scripts/docker-wheelhouse.sh [DIR]     (default: $DANDELION_DOCKER_CACHE/wheelhouse)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${DANDELION_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dandelion/docker}"
DEST="${1:-$CACHE/wheelhouse}"
mkdir -p "$DEST"
reqs="$(mktemp)"
trap 'rm -f "$reqs" "$reqs".part-*' EXIT
# The pins of the lock (comments and hashes dropped), and the Dockerfiles' build tools.
[[ "$(uname -m)" == x86_64 ]] || { echo "wheelhouse: x86_64 only" >&2; exit 1; }
grep -E '^[A-Za-z0-9_.-]+(\[[^]]*\])?==' requirements.lock | sed 's/ .*//' >"$reqs"
grep -hoE 'uv==[0-9.]+' docker/*.Dockerfile | sort -u >>"$reqs"
stamp="$DEST/.complete-$(cat "$reqs" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
    echo "wheelhouse up to date: $DEST"
    exit 0
fi
# pip downloads (uv has no download command): scripts/pip.sh finds a pip wherever this runs
# (inside nox, python3 is the shared .venv's, which uv creates without pip).
pip=(scripts/pip.sh)
echo "wheelhouse: downloading with $(scripts/pip.sh --which)"
# The images are Debian bookworm, Python 3.11, x86_64 (glibc 2.36), like the machines that
# build them: download for this interpreter and platform. Four parallel downloaders (the time
# is spent in index round trips, not bandwidth).
split -n l/4 "$reqs" "$reqs.part-"
pids=()
for part in "$reqs".part-*; do
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: -r "$part" -d "$DEST" \
        2> >(grep -v "is ignored: it is neither" >&2) &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
rm -f "$reqs".part-*
[[ $status -eq 0 ]] || { echo "wheelhouse: download failed" >&2; exit 1; }
touch "$stamp"
echo "wheelhouse: $DEST ($(du -sh "$DEST" | cut -f1))"
