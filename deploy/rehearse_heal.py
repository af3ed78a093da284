"""After the PostgreSQL outage of `nox -s rehearse`: the scheduler must heartbeat again, and a
stale heartbeat is diagnosed while it happens.

Once the freshest scheduler heartbeat is older than WEDGED_AFTER_S, the rehearsal records what
the scheduler's database sessions are doing (`pg_stat_activity` of the `airflow` database) and,
once compose's health probe has ended the wedged scheduler (docker/healthcheck.py, SIGABRT under
PYTHONFAULTHANDLER), every thread's stack from the container's log. Both are written to the
rehearsal's folder and summed up in the step's result.
"""

from __future__ import annotations

import time

from deploy import rehearse as rh
from deploy.dockerkit import StepFailed

WEDGED_AFTER_S = 60
# A live scheduler heartbeats every 5 s ([scheduler] scheduler_heartbeat_sec).
LIVE_S = 15
ACTIVITY = (
    "select pid, application_name, client_addr, state, wait_event_type, wait_event, "
    "round(extract(epoch from now() - state_change)), left(regexp_replace(query, '\\s+', ' ', "
    "'g'), 120) from pg_stat_activity where datname = 'airflow' order by state_change"
)


def _stacks(r: rh.Rehearsal) -> str:
    """The faulthandler dumps in the scheduler's log (empty when none was printed)."""
    log = r.compose("logs", "--no-log-prefix", "airflow-scheduler", check=False).stdout
    start = log.find("Fatal Python error")
    return log[start:][:20000] if start >= 0 else ""


def scheduler_heals(r: rh.Rehearsal, timeout_s: float = 420) -> str:
    """Wait for a heartbeat under LIVE_S s old; diagnose a stale one on the way."""
    activity: list[list[str]] = []
    worst = 0.0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            age = rh._scheduler_heartbeat_age(r)
        except StepFailed:
            age = None  # the database may still be starting
        if age is not None and age < LIVE_S:
            break
        worst = max(worst, age or 0.0)
        if age is not None and age > WEDGED_AFTER_S and not activity:
            activity = rh._airflow_db(r, ACTIVITY)
            (r.workdir / "pg_stat_activity.txt").write_text(
                "\n".join("|".join(row) for row in activity) + "\n"
            )
        time.sleep(3)
    else:
        raise StepFailed(
            f"no scheduler heartbeat under {LIVE_S} s within {timeout_s:.0f} s (worst "
            f"{worst:.0f} s); pg_stat_activity: {activity}; {rh._airflow_diagnosis(r)}"
        )
    if worst <= WEDGED_AFTER_S:
        return f"scheduler heartbeat never older than {WEDGED_AFTER_S} s"
    stacks = _stacks(r)
    (r.workdir / "scheduler-stacks.txt").write_text(stacks)
    first = next((line for line in stacks.splitlines() if line.startswith("  File")), "none")
    return (
        f"scheduler heartbeat reached {worst:.0f} s, healed by its health probe; "
        f"pg_stat_activity ({len(activity)} sessions): {activity[:4]}; main stack top: {first} "
        f"(full: {r.workdir}/scheduler-stacks.txt)"
    )


FREEZE = "import os, signal; os.kill(-1, signal.SIGSTOP)"


def fault_scheduler_frozen(r: rh.Rehearsal) -> str:
    """Every process of the scheduler container stopped (SIGSTOP: alive, silent, as a wedged
    scheduler): its health probe must end them and the restart policy start it again."""
    _wait_live(r)
    before = rh._restarts(r).get("airflow-scheduler", 0)
    r.exec("airflow-scheduler", "python", "-c", FREEZE)
    frozen = time.monotonic()
    rh._wait(
        "the scheduler container restarted by its health probe",
        lambda: rh._restarts(r).get("airflow-scheduler", 0) > before,
        420,
        every=5,
    )
    restarted = time.monotonic() - frozen
    _wait_live(r)
    return (
        f"scheduler frozen: restarted by its health probe {restarted:.0f} s later, heartbeating "
        f"again {time.monotonic() - frozen:.0f} s after the freeze"
    )


def _wait_live(r: rh.Rehearsal) -> None:
    def live() -> bool:
        age = rh._scheduler_heartbeat_age(r)
        return age is not None and age < LIVE_S

    rh._wait(f"a scheduler heartbeat under {LIVE_S} s old", live, 420, every=3)
