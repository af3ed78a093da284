#!/usr/bin/env bash
# /clean-logs of the pipeline image: the log groomer that the Airflow Helm chart runs as a
# sidecar (`bash /clean-logs`, scheduler, triggerer, dag-processor and workers), with the
# official image's settings:
#   AIRFLOW__LOG_RETENTION_DAYS              delete *.log files older than this (default 15)
#   AIRFLOW__LOG_CLEANUP_FREQUENCY_MINUTES   how often (default 15)
#   AIRFLOW__LOG_MAX_SIZE_BYTES              then, oldest first, until the logs fit (0 = off)
# under $AIRFLOW_HOME/logs (also: empty folders go). Runs until SIGTERM/SIGINT, which end it
# at once (the pod's shutdown).
set -euo pipefail
logs="${AIRFLOW_HOME:-/opt/airflow}/logs"
retention="${AIRFLOW__LOG_RETENTION_DAYS:-15}"
every=$((${AIRFLOW__LOG_CLEANUP_FREQUENCY_MINUTES:-15} * 60))
max_bytes="${AIRFLOW__LOG_MAX_SIZE_BYTES:-0}"
trap 'exit 0' INT TERM

trim_to_size() {
    [[ "$max_bytes" -gt 0 ]] || return 0
    local total size path
    total="$(find "$logs" -type f -name '*.log' -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
    while [[ "$total" -gt "$max_bytes" ]] && read -r -d '' size path; do
        rm -f -- "$path"
        total=$((total - size))
    done < <(find "$logs" -type f -name '*.log' -printf '%T@ %s %p\0' | sort -z -n |
        cut -z -d' ' -f2-)
}

echo "clean-logs: every ${every} s, $logs: *.log older than ${retention} days" \
    "$([[ "$max_bytes" -gt 0 ]] && echo "and beyond ${max_bytes} bytes")"
while true; do
    if [[ -d "$logs" ]]; then
        find "$logs" -type d -name 'lost+found' -prune -o \
            -type f -name '*.log' -mtime +"$retention" -print0 | xargs -0 -r rm -f -- || true
        trim_to_size || true
        find "$logs" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    fi
    # sleep in the background so that a signal ends the wait at once
    sleep "$every" &
    wait $! || true
done
