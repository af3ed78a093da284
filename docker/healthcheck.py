"""Container health probe: exit 0 when the URL answers 2xx, else 1 (stdlib only).

Used by the images' HEALTHCHECK and by compose, as the slim base images ship no curl.
Usage: python /usr/local/bin/dandelion-healthcheck http://127.0.0.1:8000/health/live

Docker never restarts a container that is only "unhealthy". With ``--restart-after N`` the probe
also heals: after N failures in a row (counted in /tmp, outside the first ``--grace`` seconds
of the container) it sends SIGABRT to every other process of the container's user, then
SIGKILL. Under ``PYTHONFAULTHANDLER=1`` SIGABRT makes each Python process print every thread's
stack to stderr (the container's log) first. The container needs an init process
(compose ``init: true``), which exits when its child dies; the restart policy then starts it
again. compose's Airflow scheduler uses it on Airflow's scheduler health check server, which
answers 503 once the scheduler's heartbeat is older than scheduler_health_check_threshold.
    python /usr/local/bin/dandelion-healthcheck --restart-after 3 --grace 180 URL
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

FAILURES = Path("/tmp/dandelion-healthcheck-failures")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return bool(200 <= response.status < 300)
    except Exception as exc:  # any failure is "unhealthy"
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return False


def container_age_s() -> float:
    """Seconds since the container's first process started (/proc/1/stat, field 22)."""
    ticks = int(Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def heal(failures: int, limit: int, grace_s: float) -> None:
    """Count a failure; at the limit, end every other process of this user (stacks first)."""
    if container_age_s() < grace_s:
        return
    FAILURES.write_text(str(failures))
    if failures < limit:
        return
    print(f"unhealthy {failures} times in a row: ending the container's processes", file=sys.stderr)
    FAILURES.unlink(missing_ok=True)
    for sig in (signal.SIGABRT, signal.SIGKILL):
        try:
            os.kill(-1, sig)  # every process this user may signal, except init and this one
        except ProcessLookupError:
            return
        time.sleep(3)


def main(argv: list[str]) -> int:
    args = argv[1:]
    limit, grace_s = 0, 0.0
    while args and args[0].startswith("--"):
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--restart-after":
            limit = int(value)
        elif flag == "--grace":
            grace_s = float(value)
        else:
            print(f"unknown option {flag}", file=sys.stderr)
            return 2
    url = args[0] if args else "http://127.0.0.1:8000/health/live"
    if healthy(url):
        FAILURES.unlink(missing_ok=True)
        return 0
    if limit:
        previous = int(FAILURES.read_text()) if FAILURES.exists() else 0
        heal(previous + 1, limit, grace_s)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
