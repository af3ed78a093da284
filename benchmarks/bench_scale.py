"""Scale: how each stage's time, memory and object-store requests grow with the number of photos.

``nox -s bench -- scale 200 1000`` generates N distinct photos per size, deterministically,
from the shared datasets (greenr and indomain-dev; :mod:`benchmarks.scale_photos`): a random
crop, a flip, colour jitter and a JPEG re-encoding of a source photo, and for 10 % of them a
near-duplicate (a re-encoding of an earlier generated photo at another quality, a pixel's
shift off). Then it runs the real stages on the embedded default, each in its own process so
that its peak RSS is its own:

* ``ingest``: :func:`dandelion_lib.data.ingest.ingest` from the folder (near-duplicates and
  the split included);
* ``ingest_s3``: the same from ``s3://scale-photos/photos``, a bucket on moto's S3 server (a
  process of its own) that the photos are uploaded to first (set-up, not timed), into a store
  of its own (:mod:`benchmarks.scale_s3`);
* ``near_dups_split``: the ingested manifest's near-duplicate grouping and split again, alone
  (:func:`~dandelion_lib.data.dataset.near_duplicate_groups`, ``assign_splits``);
* ``plan``: the extraction plan (:func:`~dandelion_lib.lifecycle.extract.write_plan`, what
  the DAGs' ``plan_features`` task calls: runs of shards, one mapped task each, each with its
  part of the manifest);
* ``extract``: one process per task, as the DAGs' mapped ``extract_features`` tasks
  (:func:`~dandelion_lib.lifecycle.extract.extract_part`): wall time and requests summed,
  peak RSS the largest task's;
* ``train``: the default recipe, from the feature store (``dandelion train``);
* ``evaluate``: the challenger on the test split (``dandelion evaluate``);
* ``promote``: the gate (``dandelion promote``).

Per stage and size it prints wall time, photos/s, peak RSS (the stage process's ``VmHWM``)
and object-store requests (calls of the store's get/put/info/list/delete; MLflow's own
artifact writes are not counted; for ``ingest_s3`` also the S3 API calls of the source
bucket's reads, by operation: list pages and GETs), then the ratio between consecutive sizes
and a projection to 1 M photos from the slope between the two largest sizes. It also times
near-duplicate grouping of synthetic perceptual hashes (``hashes=1000000``, the default) in a
process of its own, stopped after ``hash_timeout=`` seconds (default 120). Results go to
``.dandelion/bench/scale.json`` (``DANDELION_BENCH_SCALE_JSON`` overrides the path);
``scale hashes`` times only the hashes (into ``scale-hashes.json`` beside it).

``backbone=stand_in`` runs the same stages on the test stand-in backbone (a quick check of
the benchmark itself, not a figure of the product). Photos and stores go to a temporary
folder, removed at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scale_photos import NEAR_SHARE, SEED, generate_photos

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("DANDELION_BENCH_SCALE_JSON", ROOT / ".dandelion/bench/scale.json"))
STAGES = (
    "ingest",
    "ingest_s3",
    "near_dups_split",
    "plan",
    "extract",
    "train",
    "evaluate",
    "promote",
)
MILLION = 1_000_000
ONLY_BY_NAME = True
"""Minutes per size on the real backbone: runs only when named (`nox -s bench -- scale`)."""


# --------------------------------------------------------------------------------------
# One stage, in its own process
# --------------------------------------------------------------------------------------

REQUESTS = Counter[str]()
S3_REQUESTS = Counter[str]()


def _count_requests() -> None:
    """Count the store's requests (its public calls) in this process."""
    from dandelion_lib.core import storage

    for cls in (storage.LocalStore, storage.S3Store):
        for name in ("put_bytes", "get_bytes", "info", "list", "delete"):
            original = cls.__dict__[name]

            def counted(self: Any, *a: Any, _f: Any = original, _n: str = name, **k: Any) -> Any:
                REQUESTS[_n] += 1
                return _f(self, *a, **k)

            setattr(cls, name, counted)


def _settings(work: Path) -> Any:
    from dandelion_lib.core.config import Settings

    return Settings(workdir=work / "work")


def _config(backbone: str) -> Any:
    from dandelion_lib.training.config import TrainConfig

    return TrainConfig(backbone=backbone)


def _stage_ingest(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.data.ingest import ingest

    result = ingest(_settings(work), source=str(work / "photos"), progress=False)
    return {"version": result.version, "images": result.images}


def _stage_ingest_s3(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Ingest from the bucket into a store of its own (not the folder's: nothing is there)."""
    from benchmarks.scale_s3 import count_s3_requests, use_dummy_credentials
    from dandelion_lib.core.config import Settings
    from dandelion_lib.data.ingest import ingest

    use_dummy_credentials()
    count_s3_requests(S3_REQUESTS)
    settings = Settings(workdir=work / "work-s3", s3_endpoint_url=args["endpoint"])
    result = ingest(settings, source=args["source"], progress=False)
    return {"version": result.version, "images": result.images}


def _stage_near_dups_split(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data import dataset

    settings = _settings(work)
    manifest = dataset.load_manifest(open_store(settings=settings))
    groups = dataset.near_duplicate_groups(
        manifest["sha256"].tolist(),
        manifest["phash"].tolist(),
        settings.ingest.near_duplicate_distance,
    )
    splits = dataset.assign_splits(
        manifest["label"].tolist(), groups, settings.ingest.split_seed, manifest["origin"].tolist()
    )
    return {
        "images": len(manifest),
        "grouped_images": int(len(groups) - len(set(groups))),
        "splits": dict(Counter(splits)),
    }


def _stage_plan(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.lifecycle.extract import write_plan

    tasks = write_plan(_config(args["backbone"]), _settings(work), "scale")
    return {"tasks": tasks, "shards": tasks[-1]["shards"][1]}


def _stage_extract(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.lifecycle.extract import extract_part

    task = args["task"]
    if "part" not in task:  # the feature cache is off: the task does nothing
        return {}
    settings = _settings(work)
    return extract_part(_config(args["backbone"]), task["part"], task["index"], settings)


def _stage_train(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.lifecycle.train import train

    r = train(_config(args["backbone"]), _settings(work), progress=False)
    keys = ("test_accuracy", "test_f1", "test_roc_auc")
    return {"model_version": r.model_version, "metrics": {k: r.metrics[k] for k in keys}}


def _stage_evaluate(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.dataset import latest_version
    from dandelion_lib.lifecycle import registry
    from dandelion_lib.lifecycle.evaluate import evaluate_split
    from dandelion_lib.serving.predict import Predictor

    settings = _settings(work)
    registry.configure_mlflow(settings)
    store = open_store(settings=settings)
    uri = f"models:/{settings.tracking.model_name}@{registry.CHALLENGER}"
    report = evaluate_split(Predictor.load(uri, settings), store, latest_version(store))
    return {"test_accuracy": report.metrics["accuracy"], "n": len(report.predictions)}


def _stage_promote(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    from dandelion_lib.lifecycle.promotion import promote

    result = promote(_settings(work))
    return {"promoted": result.promoted}


def _peak_rss_mib() -> float:
    """This process's peak RSS since it started its program (``VmHWM``: unlike ``ru_maxrss``,
    not raised by the parent's memory at fork), in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_stage(name: str, work: str, args_json: str) -> None:
    """Child process: run one stage, print its figures as one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _count_requests()
    start = time.perf_counter()
    out = globals()[f"_stage_{name}"](Path(work), json.loads(args_json))
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    figures = {"seconds": seconds, "peak_rss_mib": peak, "requests": dict(REQUESTS), "out": out}
    figures["s3_requests"] = dict(S3_REQUESTS)
    print("SCALE-STAGE " + json.dumps(figures, default=str), flush=True)


def _child(name: str, work: Path, **args: Any) -> dict[str, Any]:
    """Run stage ``name`` in a fresh process; its figures."""
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--stage", name, str(work)]
    proc = subprocess.run(
        [*command, json.dumps(args)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE-STAGE ")]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"stage {name} failed ({proc.returncode}):\n{tail}")
    return dict(json.loads(lines[-1].removeprefix("SCALE-STAGE ")))


# --------------------------------------------------------------------------------------
# One size: every stage
# --------------------------------------------------------------------------------------


def _extract_all(work: Path, groups: list[dict[str, Any]], backbone: str) -> dict[str, Any]:
    """Every mapped extraction task (a run of shards) in its own process, one after another
    (one worker)."""
    tasks = [_child("extract", work, backbone=backbone, task=g) for g in groups]
    requests = Counter[str]()
    for t in tasks:
        requests.update(t["requests"])
    return {
        "seconds": sum(t["seconds"] for t in tasks),
        "peak_rss_mib": max(t["peak_rss_mib"] for t in tasks),
        "requests": dict(requests),
        "out": {"tasks": len(groups), "task_seconds_max": max(t["seconds"] for t in tasks)},
    }


def run_size(n: int, backbone: str, tmp: Path, only: str = "all") -> dict[str, Any]:
    """Generate ``n`` photos and run every stage on them (``only``: the named ones, comma
    separated, and those they need); figures per stage."""
    work = tmp / f"n{n}"
    start = time.perf_counter()
    kinds = generate_photos(n, work / "photos")
    print(f"\n{n} photos generated in {time.perf_counter() - start:.1f} s: {kinds}", flush=True)
    stages: dict[str, Any] = {}
    wanted = STAGES if only == "all" else _needed(only.split(","))
    for name in wanted:
        if name == "extract":
            stages[name] = _extract_all(work, stages["plan"]["out"]["tasks"], backbone)
        elif name == "ingest_s3":
            stages[name] = _ingest_s3(work, backbone)
        else:
            stages[name] = _child(name, work, backbone=backbone)
        _print_stage(n, name, stages[name])
    return {"photos": n, "generated": kinds, "stages": stages}


def _ingest_s3(work: Path, backbone: str) -> dict[str, Any]:
    """The photos uploaded to a bucket on moto's S3 server (set-up), then ingested from it."""
    from benchmarks.scale_s3 import photo_bucket

    with photo_bucket(work / "photos") as bucket:
        print(f"  ({bucket['objects']} photos uploaded in {bucket['upload_seconds']:.1f} s)")
        args = {"source": bucket["source"], "endpoint": bucket["endpoint"]}
        return _child("ingest_s3", work, backbone=backbone, **args)


def _needed(names: list[str]) -> tuple[str, ...]:
    """The stages ``names`` and those before them that they need, in order."""
    unknown = set(names) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; stages: {list(STAGES)}")
    last = max(STAGES.index(n) for n in names)
    needs = {"ingest"} if set(names) - {"ingest", "ingest_s3"} else set()
    needs |= {"plan"} if "extract" in names else set()
    return tuple(n for i, n in enumerate(STAGES) if n in names or (i < last and n in needs))


def _print_stage(n: int, name: str, s: dict[str, Any]) -> None:
    requests = sum(s["requests"].values())
    s3 = f" {sum(s3.values())} S3 requests {s3}" if (s3 := s.get("s3_requests")) else ""
    print(
        f"  {name:16s} {s['seconds']:8.1f} s {n / max(s['seconds'], 1e-9):9.1f} photos/s "
        f"peak RSS {s['peak_rss_mib']:7.0f} MiB  {requests:7d} store requests{s3}  {s['out']}",
        flush=True,
    )


# --------------------------------------------------------------------------------------
# Near-duplicate grouping of synthetic hashes
# --------------------------------------------------------------------------------------


def _stage_hashes(work: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Group ``args["n"]`` synthetic 64-bit hashes, 10 % of them a few bits off another."""
    from dandelion_lib.data.dataset import near_duplicate_groups

    n = int(args["n"])
    rng = np.random.default_rng(SEED)
    values = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    near = rng.random(n) < NEAR_SHARE
    near[0] = False
    sources = (rng.random(n) * np.arange(n)).astype(np.int64)
    flips = np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
    values[near] = values[sources[near]] ^ flips[near]
    hashes = [f"{int(v):016x}" for v in values]
    shas = [f"{i:064x}" for i in range(n)]
    start = time.perf_counter()
    groups = near_duplicate_groups(shas, hashes, 8)
    return {"n": n, "group_seconds": time.perf_counter() - start, "groups": len(set(groups))}


def time_hashes(sizes: list[int], timeout: float, tmp: Path) -> list[dict[str, Any]]:
    """Near-duplicate grouping at each size, each in a process stopped after ``timeout``."""
    out: list[dict[str, Any]] = []
    for n in sizes:
        try:
            command = [sys.executable, "-m", "benchmarks.bench_scale", "--stage", "hashes"]
            proc = subprocess.run(
                [*command, str(tmp), json.dumps({"n": n})],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE-STAGE ")][-1]
            figures = json.loads(line.removeprefix("SCALE-STAGE "))
            row = {"n": n, "seconds": figures["out"]["group_seconds"]}
            row["peak_rss_mib"] = figures["peak_rss_mib"]
        except subprocess.TimeoutExpired:
            row = {"n": n, "seconds": None, "timed_out_after_s": timeout}
        out.append(row)
        shown = f"{row['seconds']:.2f} s" if row["seconds"] is not None else f"> {timeout:.0f} s"
        print(f"  near-duplicate grouping of {n:>9,} hashes: {shown}", flush=True)
        if row["seconds"] is None:
            break
    return out


# --------------------------------------------------------------------------------------
# Ratios and the projection to 1 M photos
# --------------------------------------------------------------------------------------


def _slope(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] != a[0] else 0.0


def _figure(stage: dict[str, Any], key: str) -> float:
    if key in ("requests", "s3_requests"):
        return float(sum(stage.get(key, {}).values()))
    return float(stage[key])


def project(runs: list[dict[str, Any]], target: int = MILLION) -> dict[str, Any]:
    """Per stage: the ratios between consecutive sizes (time per photo, peak RSS, requests
    per photo) and, from the slope between the two largest sizes, the time, peak RSS and
    requests at ``target`` photos (a stage that does not grow keeps its largest figure)."""
    out: dict[str, Any] = {}
    for name in (n for n in STAGES if n in runs[0]["stages"]):
        points = [(r["photos"], r["stages"][name]) for r in runs]
        ratios = []
        for (n0, s0), (n1, s1) in itertools.pairwise(points):
            ratios.append(
                {
                    "from": n0,
                    "to": n1,
                    "time_per_photo": (s1["seconds"] / n1) / (s0["seconds"] / n0),
                    "peak_rss": s1["peak_rss_mib"] / s0["peak_rss_mib"],
                }
            )
        (n0, s0), (n1, s1) = points[-2] if len(points) > 1 else points[-1], points[-1]
        row: dict[str, Any] = {"ratios": ratios}
        for key in ("seconds", "peak_rss_mib", "requests", "s3_requests"):
            y0, y1 = _figure(s0, key), _figure(s1, key)
            slope = max(_slope((n0, y0), (n1, y1)), 0.0)
            row[f"{key}_per_photo"] = slope
            row[f"{key}_at_{target}"] = y1 + slope * (target - n1)
        out[name] = row
    return out


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _print_projection(projection: dict[str, Any], target: int = MILLION) -> None:
    print(f"\nratios between sizes and projection to {target:,} photos (slope of the two largest):")
    for name, row in projection.items():
        if not row["ratios"]:
            print(f"  {name:16s} (one size: no slope to project)")
            continue
        ratios = "; ".join(
            f"{r['from']}->{r['to']}: time/photo x{r['time_per_photo']:.2f}, "
            f"peak RSS x{r['peak_rss']:.2f}"
            for r in row["ratios"]
        )
        print(
            f"  {name:16s} {ratios or '(one size)'}\n"
            f"  {'':16s} at {target:,}: {_duration(row[f'seconds_at_{target}'])} on one worker, "
            f"{row['seconds_per_photo'] * 1000:.1f} ms per photo, peak RSS "
            f"{row[f'peak_rss_mib_at_{target}'] / 1024:6.2f} GiB, "
            f"{row[f'requests_at_{target}']:,.0f} store requests"
            + (f", {s3:,.0f} S3 requests" if (s3 := row[f"s3_requests_at_{target}"]) else "")
        )


def _parse(argv: tuple[str, ...]) -> tuple[list[int], dict[str, Any]]:
    """Sizes (numbers), ``key=value`` options (``backbone``, ``hashes``, ``hash_timeout``) and
    the word ``hashes`` (only the near-duplicate grouping of synthetic hashes)."""
    sizes: list[int] = []
    options: dict[str, Any] = {"backbone": "efficientnet_lite0", "hashes": MILLION}
    options["hash_timeout"] = 120.0
    options["only_hashes"] = "hashes" in argv
    options["stages"] = "all"
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "hashes":
            continue
        if not value:
            sizes.append(int(arg))
        elif key in options:
            options[key] = type(options[key])(value)
        else:
            raise SystemExit(f"unknown option {key!r}; options: {sorted(options)}")
    if options["only_hashes"]:
        return [], options
    return sorted(sizes) or [200, 1000], options


def main(*argv: str) -> int:
    if len(argv) >= 3 and argv[0] == "--stage":
        run_stage(argv[1], argv[2], argv[3] if len(argv) > 3 else "{}")
        return 0
    sizes, options = _parse(argv)
    print(f"scale: sizes {sizes}, backbone {options['backbone']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dandelion-scale-") as tmp:
        runs = [run_size(n, options["backbone"], Path(tmp), options["stages"]) for n in sizes]
        projection = project(runs) if runs else {}
        _print_projection(projection)
        steps = sorted({10_000, 30_000, int(options["hashes"])})
        print("\nnear-duplicate grouping of synthetic 64-bit hashes (10 % near-duplicates):")
        hashes = time_hashes(steps, float(options["hash_timeout"]), Path(tmp))
    result = {"sizes": sizes, "options": options, "runs": runs}
    result |= {"projection": projection, "near_duplicate_hashes": hashes}
    out = OUT if runs else OUT.with_name(f"{OUT.stem}-hashes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
