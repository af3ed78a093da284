#!/usr/bin/env bash
# /entrypoint of the pipeline image: the contract of the official apache/airflow image's
# entrypoint that the Airflow Helm chart relies on (its probes run
# `sh -c "CONNECTION_CHECK_MAX_COUNT=0 ... exec /entrypoint airflow jobs check ..."`):
#   /entrypoint bash ARGS...     exec bash ARGS
#   /entrypoint python ARGS...   exec python ARGS
#   /entrypoint airflow ARGS...  exec airflow ARGS
#   /entrypoint SUBCOMMAND ...   exec airflow SUBCOMMAND ... (e.g. `/entrypoint scheduler`)
#   /entrypoint                  exec airflow version
# Before an Airflow command, it waits for the metadata database as the official one does:
# CONNECTION_CHECK_MAX_COUNT tries (default 20, 0 = no check), CONNECTION_CHECK_SLEEP_TIME s
# apart (default 3). The image keeps no ENTRYPOINT: compose and the chart pass full commands.
set -euo pipefail

wait_for_database() {
    local max="${CONNECTION_CHECK_MAX_COUNT:-20}" pause="${CONNECTION_CHECK_SLEEP_TIME:-3}"
    [[ "$max" -gt 0 ]] || return 0
    local try
    for ((try = 1; try <= max; try++)); do
        if airflow db check >/dev/null 2>&1; then
            return 0
        fi
        echo "entrypoint: metadata database not reachable (try $try of $max)" >&2
        sleep "$pause"
    done
    echo "entrypoint: metadata database unreachable after $max tries" >&2
    exit 1
}

command="${1:-}"
case "$command" in
    bash | python)
        shift
        exec "$command" "$@"
        ;;
    airflow)
        shift
        ;;
    "")
        set -- version
        ;;
esac
case "${1:-}" in
    version | info | config | cheat-sheet) ;;
    *) wait_for_database ;;
esac
exec airflow "$@"
