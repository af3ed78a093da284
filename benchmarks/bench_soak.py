"""Soak: mixed traffic against ``python -m api`` for N minutes; memory, latency, nothing lost.

Run with ``nox -s bench -- soak [MINUTES]`` (default 30). The API serves the served
architecture (EfficientNet-Lite0 + an untrained head) from an embedded MLflow registry,
registered as in :mod:`benchmarks.bench_serve`, with its feedback database (SQLite) in a
temporary workdir. A few client threads send, over loopback and without pauses:

* ``POST /predict`` with a raw ``image/jpeg`` body or a multipart ``file`` field;
* ``POST /predict/batch`` with 2-12 images (so the micro-batches vary in size);
* ``POST /feedback`` on a share of the answered predictions (JSON, or multipart with the image);
* ``GET /model``, ``/health/ready``, ``/metrics``;
* bad inputs (corrupt bytes, a truncated JPEG, an empty body), which must answer 4xx.

Every minute one line: elapsed, the API process's RSS (``VmRSS`` of ``/proc/<pid>/status``)
at the end of the minute and the median and maximum of its samples every 5 s, threads, open
fds, requests, p50/p95/p99 latency of that minute, 5xx. At the end: totals, the nothing-lost
check (every prediction id answered 200 is in the ``predictions`` table, every feedback id
answered 201 in ``feedback``), the RSS of the last minute over the first and the slope of RSS
over the second half and after minute 5 (MiB/min, least squares; both from the minutes' medians), and the
memory limits the Kubernetes manifests set for the API. Exits non-zero on any 5xx, any unexpected status,
any request without an answer, or anything lost.

The API runs with the glibc malloc settings its image sets (the ``MALLOC_*`` variables of
docker/api.Dockerfile, see docs/reliability.md); ``nox -s bench -- soak 30 glibc`` runs it
with glibc's defaults instead, to compare. The third argument is the ONNX Runtime precision
served (``fp32``, the default, or ``int8``): ``nox -s bench -- soak 10 image int8``.

``nox -s bench -- soak 30 image fp32 container`` runs the API in its built image instead
(``nox -s images`` first; the tag compose.yaml gives it), as compose runs it: read-only with a
tmpfs ``/tmp``, every capability dropped, ``no-new-privileges``, 2 CPUs and a 1 GiB memory
limit, the image's own allocator settings. The temporary workdir (the registry and the
feedback database) is mounted at the same path and the container shares the host's network;
RSS is the container's API process's, read from the host's ``/proc``.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

from benchmarks.bench_serve import (
    ROOT,
    _images,
    _register,
    _server_options,
    _set_precision,
    proc_status,
)
from tests.process_support import free_port, running, stop, wait_http

DEFAULT_MINUTES = 30.0
SETTLED_AFTER_MIN = 5
"""The slope that must stay flat starts here (minute 5 to the end: warm-up excluded)."""
ONLY_BY_NAME = True  # 30 minutes: `nox -s bench` without names leaves it out
CLIENTS = 4
RSS_EVERY_S = 5.0
FEEDBACK_SHARE = 0.3
SEED = 20261130

# (kind, weight): the mix each client draws from.
MIX = [
    ("predict-raw", 40),
    ("predict-multipart", 15),
    ("batch", 10),
    ("model", 5),
    ("ready", 5),
    ("metrics", 3),
    ("bad-corrupt", 3),
    ("bad-truncated", 2),
    ("bad-empty", 2),
]


@dataclass
class Tally:
    """What the clients saw; appended to under ``lock`` by every client thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    window: list[float] = field(default_factory=list)  # latencies (s) of the current minute
    window_5xx: int = 0
    requests: int = 0
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    errors_5xx: int = 0
    unexpected: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    prediction_ids: list[str] = field(default_factory=list)
    feedback_ids: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, latency: float) -> None:
        with self.lock:
            self.requests += 1
            self.window.append(latency)
            self.by_kind.setdefault(kind, []).append(latency)
            counts = self.statuses.setdefault(kind, {})
            counts[status] = counts.get(status, 0) + 1
            if status >= 500:
                self.errors_5xx += 1
                self.window_5xx += 1

    def take_window(self) -> tuple[list[float], int]:
        with self.lock:
            window, n5xx = self.window, self.window_5xx
            self.window, self.window_5xx = [], 0
        return window, n5xx


# --- requests -----------------------------------------------------------------------------
def _multipart(
    files: list[tuple[str, str, bytes]], fields: dict[str, str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """A ``multipart/form-data`` body: ``files`` as (field, filename, bytes)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Client:
    """One keep-alive connection sending the mix; reconnects after a transport error."""

    def __init__(self, k: int, port: int, images: list[bytes], tally: Tally):
        self.port = port
        self.images = images
        self.tally = tally
        self.rng = random.Random(SEED + k)
        self.conn = HTTPConnection("127.0.0.1", port, timeout=120)
        kinds, weights = zip(*MIX, strict=True)
        self.kinds, self.weights = list(kinds), list(weights)

    def _send(
        self, kind: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes] | None:
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, HTTPException) as exc:
            self.conn.close()
            self.conn = HTTPConnection("127.0.0.1", self.port, timeout=120)
            with self.tally.lock:
                self.tally.transport_errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return None
        self.tally.record(kind, response.status, time.perf_counter() - start)
        return response.status, data

    def _expect(self, kind: str, got: tuple[int, bytes] | None, ok: tuple[int, ...]) -> bool:
        if got is None:
            return False
        status, data = got
        if status not in ok:
            with self.tally.lock:
                self.tally.unexpected.append(f"{kind}: {status} {data[:200]!r}")
            return False
        return True

    def _image(self) -> bytes:
        return self.images[self.rng.randrange(len(self.images))]

    def _predicted(self, kind: str, got: tuple[int, bytes] | None, image: bytes) -> None:
        if not self._expect(kind, got, (200,)):
            return
        assert got is not None
        answer = json.loads(got[1])
        with self.tally.lock:
            self.tally.prediction_ids.append(answer["prediction_id"])
        if self.rng.random() < FEEDBACK_SHARE:
            self._feedback(answer["prediction_id"], image, list(answer["probabilities"]))

    def _feedback(self, prediction_id: str, image: bytes, labels: list[str]) -> None:
        label = self.rng.choice(labels)  # the served model's labels
        if self.rng.random() < 1 / 3:
            body, headers = _multipart(
                [("image", "feedback.jpg", image)],
                {"prediction_id": prediction_id, "correct_label": label},
            )
            kind = "feedback-image"
        else:
            body = json.dumps({"prediction_id": prediction_id, "correct_label": label}).encode()
            headers, kind = {"Content-Type": "application/json"}, "feedback-json"
        got = self._send(kind, "POST", "/feedback", body, headers)
        if self._expect(kind, got, (201,)):
            assert got is not None
            with self.tally.lock:
                self.tally.feedback_ids.append(json.loads(got[1])["feedback_id"])

    def step(self) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind == "predict-raw":
            image = self._image()
            got = self._send(kind, "POST", "/predict", image, {"Content-Type": "image/jpeg"})
            self._predicted(kind, got, image)
        elif kind == "predict-multipart":
            image = self._image()
            body, headers = _multipart([("file", "photo.jpg", image)])
            self._predicted(kind, self._send(kind, "POST", "/predict", body, headers), image)
        elif kind == "batch":
            batch = [self._image() for _ in range(self.rng.randint(2, 12))]
            body, headers = _multipart([("files", f"{i}.jpg", d) for i, d in enumerate(batch)])
            got = self._send(kind, "POST", "/predict/batch", body, headers)
            if self._expect(kind, got, (200,)):
                assert got is not None
                results = json.loads(got[1])["results"]
                if any(item.get("prediction") is None for item in results):
                    with self.tally.lock:
                        self.tally.unexpected.append(f"batch: an item failed: {results!r:.300}")
                for item, image in zip(results, batch, strict=True):
                    if item.get("prediction") is not None:
                        with self.tally.lock:
                            self.tally.prediction_ids.append(item["prediction"]["prediction_id"])
                        if self.rng.random() < FEEDBACK_SHARE / 4:
                            pred = item["prediction"]
                            self._feedback(
                                pred["prediction_id"], image, list(pred["probabilities"])
                            )
        elif kind in ("model", "ready", "metrics"):
            path = {"model": "/model", "ready": "/health/ready", "metrics": "/metrics"}[kind]
            self._expect(kind, self._send(kind, "GET", path, None, {}), (200,))
        elif kind == "bad-corrupt":
            body = self.rng.randbytes(self.rng.randint(64, 4096))
            got = self._send(kind, "POST", "/predict", body, {"Content-Type": "image/jpeg"})
            self._expect(kind, got, tuple(range(400, 500)))
        elif kind == "bad-truncated":
            image = self._image()
            body = image[: len(image) // 3]
            got = self._send(kind, "POST", "/predict", body, {"Content-Type": "image/jpeg"})
            self._expect(kind, got, tuple(range(400, 500)))
        else:  # bad-empty
            self._expect(
                kind, self._send(kind, "POST", "/predict", b"", {}), tuple(range(400, 500))
            )

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.conn.close()


# --- measurements -------------------------------------------------------------------------
def proc_sample(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, threads, open fds) of a process, from /proc."""
    fields = proc_status(pid)
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024.0
    return rss_mib, int(fields["Threads"]), sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (nan with fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def k8s_memory_limits() -> list[str]:
    """``path: limit`` for each memory limit set on the API container in k8s/."""
    found = []
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        text = path.read_text()
        if "name: api" not in text:
            continue
        match = re.search(r"limits:\s*\n(?:\s+\S+:.*\n)*?\s+memory:\s*(\S+)", text)
        if match and "kind: Deployment" in text:
            found.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
    return found


def missing_rows(db: Path, table: str, column: str, ids: list[str]) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        present = {row[0] for row in conn.execute(f"SELECT {column} FROM {table}")}
    return [i for i in ids if i not in present]


# --- main ---------------------------------------------------------------------------------
def _line(
    minute: int, rss: list[float], threads: int, fds: int, window: list[float], n5xx: int
) -> str:
    ordered = sorted(window)
    ms = [percentile(ordered, q) * 1000.0 for q in (0.5, 0.95, 0.99)]
    return (
        f"{minute:>4} {rss[-1]:>9.1f} {statistics.median(rss):>9.1f} {max(rss):>9.1f} "
        f"{threads:>7} {fds:>5} {len(window):>7} "
        f"{ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f} {n5xx:>5}"
    )


def _report(
    tally: Tally,
    samples: list[tuple[float, float]],
    lost_predictions: list[str],
    lost_feedback: list[str],
) -> list[str]:
    """Print the totals; returns the failures."""
    print(f"\ncores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'request':<18} {'n':>7} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for kind, _ in [*MIX, ("feedback-json", 0), ("feedback-image", 0)]:
        ordered = sorted(tally.by_kind.get(kind, []))
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.get(kind, {}).items()))
        print(
            f"{kind:<18} {len(ordered):>7} {percentile(ordered, 0.5) * 1000:>8.1f} "
            f"{percentile(ordered, 0.99) * 1000:>8.1f}  {statuses}"
        )
    print(f"requests: {tally.requests}, 5xx: {tally.errors_5xx}")
    print(
        f"nothing lost: {len(tally.prediction_ids) - len(lost_predictions)}/"
        f"{len(tally.prediction_ids)} predictions answered 200 are in `predictions`, "
        f"{len(tally.feedback_ids) - len(lost_feedback)}/{len(tally.feedback_ids)} feedback "
        f"answered 201 are in `feedback`"
    )
    if samples:
        first, last = samples[0][1], samples[-1][1]
        half = [s for s in samples if s[0] > len(samples) / 2]
        settled = [s for s in samples if s[0] >= SETTLED_AFTER_MIN]
        print(
            f"RSS (median of each minute's samples) last minute / first minute: "
            f"{last:.1f} / {first:.1f} MiB = {last / first:.3f}; "
            f"slope over the second half: "
            f"{slope([s[0] for s in half], [s[1] for s in half]):+.2f} MiB/min; "
            f"slope after minute {SETTLED_AFTER_MIN}: "
            f"{slope([s[0] for s in settled], [s[1] for s in settled]):+.2f} MiB/min"
        )
    limits = k8s_memory_limits()
    print("Kubernetes memory limit of the API: " + ("; ".join(limits) or "none found"))

    failures = []
    if tally.errors_5xx:
        failures.append(f"{tally.errors_5xx} answers 5xx")
    if tally.unexpected:
        failures.append(f"{len(tally.unexpected)} unexpected answers, e.g. {tally.unexpected[:3]}")
    if tally.transport_errors:
        failures.append(
            f"{len(tally.transport_errors)} requests without an answer, "
            f"e.g. {tally.transport_errors[:3]}"
        )
    if lost_predictions:
        failures.append(f"{len(lost_predictions)} predictions lost, e.g. {lost_predictions[:3]}")
    if lost_feedback:
        failures.append(f"{len(lost_feedback)} feedback lost, e.g. {lost_feedback[:3]}")
    return failures


def image_allocator_env() -> dict[str, str]:
    """The glibc malloc settings (``MALLOC_*``) the API image sets (docker/api.Dockerfile)."""
    text = (ROOT / "docker/api.Dockerfile").read_text()
    return dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))


def _allocator(env: dict[str, str], allocator: str) -> str:
    """Set the API's malloc variables in ``env`` for ``allocator``; returns them as text."""
    if allocator == "image":
        for key, value in image_allocator_env().items():
            env.setdefault(key, value)
    elif allocator == "glibc":
        for key in [k for k in env if k.startswith("MALLOC_")]:
            del env[key]
    else:
        raise SystemExit(f"allocator must be 'image' or 'glibc', not {allocator!r}")
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("MALLOC_"))


@dataclass
class Served:
    """The API under load: the process that runs it (``python -m api``, or ``docker run``)
    and the pid whose memory is measured (the API process itself)."""

    proc: subprocess.Popen[bytes]
    pid: int


@contextmanager
def _serving(
    where: str, workdir: Path, port: int, tmp: str, allocator: str
) -> Iterator[tuple[Served, str]]:
    """The API serving ``workdir``'s registry on ``port`` until the block ends, in this
    environment (``process``) or in its image (``container``); yields it and its allocator
    settings as text."""
    options = _server_options(workdir, port, tmp)
    if where == "process":
        allocator_env = _allocator(options["env"], allocator)
        with running(["-m", "api"], f"http://127.0.0.1:{port}/health/ready", **options) as proc:
            yield Served(proc, proc.pid), allocator_env
        return
    if where != "container":
        raise SystemExit(f"where must be 'process' or 'container', not {where!r}")
    if allocator != "image":
        raise SystemExit("the container runs with its image's allocator settings only")
    with _container(workdir, port, options) as served:
        allocator_env = " ".join(f"{k}={v}" for k, v in sorted(image_allocator_env().items()))
        yield served, f"{allocator_env} (the image's)"


@contextmanager
def _container(workdir: Path, port: int, options: dict[str, Any]) -> Iterator[Served]:
    """``docker run`` of the API image as compose runs it (see the module docstring)."""
    name = f"dandelion-soak-{uuid.uuid4().hex[:8]}"
    # The image's user (10001) writes the feedback database and reads the model's artifacts.
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    env = {k: v for k, v in options["env"].items() if k.startswith("DANDELION_")}
    env["DANDELION_API_HOST"] = "127.0.0.1"
    # The image has MLflow's client only (no SQL store): it reads the registry through a
    # tracking server, as in the stack; the artifacts are read from the mounted workdir.
    mlflow_port = free_port()
    env["DANDELION_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    server = running(
        [
            "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        ],
        f"http://127.0.0.1:{mlflow_port}/health",
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        log=options["log"].with_name("mlflow.log"),
        timeout=120,
    )  # fmt: skip
    with server, _api_container(name, env, workdir, options) as served:
        yield served


@contextmanager
def _api_container(
    name: str, env: dict[str, str], workdir: Path, options: dict[str, Any]
) -> Iterator[Served]:
    from deploy.dockerkit import image_tag

    port = env["DANDELION_API_PORT"]
    command = [
        "docker", "run", "--rm", "--name", name, "--network", "host", "--read-only",
        "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--cpus", "2", "--memory", "1g", "-v", f"{workdir}:{workdir}",
        *[arg for key, value in sorted(env.items()) for arg in ("-e", f"{key}={value}")],
        image_tag("api"),
    ]  # fmt: skip
    with options["log"].open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(
                f"http://127.0.0.1:{port}/health/ready",
                timeout=options["timeout"],  # same as for the process
                proc=proc,
                ready=options["ready"],
            )
            pid = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Pid}}", name],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            yield Served(proc, int(pid))
        finally:
            stop(proc)
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def _sample_minute(served: Served, end: float) -> tuple[list[float], int, int]:
    """RSS every RSS_EVERY_S until ``end`` (a batch in flight maps its buffers for a moment,
    so one sample can mislead), and the threads and fds at ``end``."""
    rss: list[float] = []
    while True:
        time.sleep(max(0.0, min(RSS_EVERY_S, end - time.monotonic())))
        if served.proc.poll() is not None:
            raise RuntimeError(f"the API exited with {served.proc.returncode}")
        value, threads, fds = proc_sample(served.pid)
        rss.append(value)
        if time.monotonic() >= end:
            return rss, threads, fds


def main(
    minutes: str | float = DEFAULT_MINUTES,
    allocator: str = "image",
    precision: str = "fp32",
    where: str = "process",
) -> int:
    """``minutes`` of load; ``allocator``: ``image`` (the API image's malloc settings, as
    deployed; variables already set here win) or ``glibc`` (glibc's defaults);
    ``precision``: the ONNX Runtime precision served (``fp32`` or ``int8``, as the gate's
    ``serving.precision`` tag would choose); ``where``: ``process`` (``python -m api`` in
    this environment) or ``container`` (the built API image, as compose runs it)."""
    minutes = float(minutes)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = _images()
    tally = Tally()
    samples: list[tuple[float, float]] = []  # (minute, median RSS MiB of the minute)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        workdir = Path(tmp) / "work"
        os.environ["DANDELION_WORKDIR"] = str(workdir)
        uri = _register(workdir, images)
        _set_precision(workdir, precision)
        port = free_port()
        with _serving(where, workdir, port, tmp, allocator) as (served, allocator_env):
            rss0, threads0, fds0 = proc_sample(served.pid)
            print(
                f"API pid {served.pid} ({where}) serving {uri} on ONNX Runtime {precision.upper()}; {CLIENTS} clients for {minutes:g} min; "
                f"allocator: {allocator_env or 'glibc defaults'}; at ready: "
                f"RSS {rss0:.1f} MiB, {threads0} threads, {fds0} fds",
                flush=True,
            )
            print(
                f"{'min':>4} {'RSS MiB':>9} {'median':>9} {'max':>9} {'threads':>7} {'fds':>5} {'requests':>7} "
                f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'5xx':>5}",
                flush=True,
            )
            stop = threading.Event()
            clients = [
                threading.Thread(
                    target=Client(k, port, images, tally).run, args=(stop,), name=f"client-{k}"
                )
                for k in range(CLIENTS)
            ]
            start = time.monotonic()
            for thread in clients:
                thread.start()
            minute = 0
            try:
                while minute < minutes:
                    minute += 1
                    rss, threads, fds = _sample_minute(served, start + 60.0 * minute)
                    samples.append((minute, statistics.median(rss)))
                    print(_line(minute, rss, threads, fds, *tally.take_window()), flush=True)
            finally:
                stop.set()
                for thread in clients:
                    thread.join(180)
            # The prediction log writes every 0.5 s; give it a few flushes before looking.
            db = workdir / "feedback.db"
            deadline = time.monotonic() + 15.0
            while True:
                lost_predictions = missing_rows(
                    db, "predictions", "prediction_id", tally.prediction_ids
                )
                lost_feedback = missing_rows(db, "feedback", "feedback_id", tally.feedback_ids)
                if not (lost_predictions or lost_feedback) or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            rss_end, threads_end, fds_end = proc_sample(served.pid)

    failures = _report(tally, samples, lost_predictions, lost_feedback)
    print(f"after the load: RSS {rss_end:.1f} MiB, {threads_end} threads, {fds_end} fds")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0
