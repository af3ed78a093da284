"""The run summary: what one pipeline run did, in a few lines, and where to look next.

The model's figures are the scores saved by the scoring step (``scores.json``,
:mod:`dandelion_lib.lifecycle.scorecard`) in the precision the gate chose to serve; a version
without saved scores shows its training run's test metrics.
"""

from __future__ import annotations

from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import run_prefix
from dandelion_lib.core.storage import ObjectNotFoundError, open_store
from dandelion_lib.lifecycle import registry, scorecard
from dandelion_lib.serving.predict import SERVING_TAG


def where_to_look(settings: Settings, run_id: str | None = None) -> dict[str, str]:
    """Commands and paths a user opens after a run."""
    uri = settings.resolved_tracking_uri
    if uri.startswith(("http://", "https://")):
        mlflow = f"open {uri}"
    else:
        mlflow = f"mlflow ui --backend-store-uri {uri} --port 5000"
    store = settings.resolved_store_url
    look = {"mlflow": mlflow, "store": store.removeprefix("file://")}
    if run_id:
        look["notebooks"] = f"{look['store'].rstrip('/')}/{run_prefix(run_id)}"
    return look


def _fmt_counts(counts: dict[str, Any]) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in counts.get("labels", {}).items())
    if counts.get("negatives"):
        labels += f", negatives {counts['negatives']}"
    splits = counts.get("splits", {})
    order = [s for s in ("train", "val", "test") if s in splits] + sorted(
        set(splits) - {"train", "val", "test"}
    )
    split_text = " / ".join(f"{s} {splits[s]}" for s in order)
    rejected = counts.get("rejected_at_ingest")
    tail = f"; {rejected} rejected at ingestion" if rejected else ""
    return f"{counts.get('images', '?')} images ({labels}; {split_text}{tail})"


def _fmt_origins(origins: dict[str, Any]) -> str:
    """Per source: its images and their splits (``counts["origins"]``)."""
    parts = []
    for origin, counts in origins.items():
        splits = " / ".join(f"{s} {counts[s]}" for s in ("train", "val", "test") if s in counts)
        parts.append(f"{origin} {counts.get('images', '?')} ({splits})")
    return "; ".join(parts)


def _fmt_model_figures(model: dict[str, Any]) -> str:
    acc = model.get("test_accuracy")
    text = f"test accuracy {acc:.4f}" if isinstance(acc, float) else "no test accuracy"
    right = model.get("test_right_answers")
    if isinstance(right, float):
        text = f"right answers {right:.4f}, {text}"
    worst = model.get("test_max_source_unknown_share")
    if isinstance(worst, float):
        text += f", in-domain photos answered unknown {worst:.4f} (worst source)"
    ood = model.get("test_ood_unknown_share")
    if isinstance(ood, float):
        text += f", out-of-domain photos answered unknown {ood:.4f}"
    return text


def feature_totals(shards: list[dict[str, Any]]) -> dict[str, int]:
    """The extraction tasks' counts added up (``shards``: one dict per mapped task)."""
    totals: dict[str, int] = {"shards": len(shards)}
    for counts in shards:
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + int(v)
    return totals


def _fmt_training(summary: dict[str, Any]) -> str:
    decision = summary["training"]
    state = (summary.get("task_states") or {}).get("train", "success")
    if not decision["train"]:
        verdict = "skipped"
    elif state == "success":
        verdict = "trained"
    else:
        verdict = f"not trained (step train {state})"
    return f"{verdict}: {decision['reason']}"


def _fmt_features(features: dict[str, int]) -> str:
    shards = features["shards"]
    return (
        f"{features.get('features_computed', 0)} embeddings computed, "
        f"{features.get('features_cached', 0)} read from the feature store "
        f"({shards} shard{'s' if shards != 1 else ''})"
    )


def _failure_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for failure in summary.get("failures", []):
        rows.append(("failed", f"{failure['task_id']}: {failure['error']}"))
        if failure.get("notebook"):
            rows.append(("", f"executed notebook: {failure['notebook']}"))
    return rows


def _data_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The dataset, training and features rows (those the run has)."""
    rows = []
    if summary.get("dataset_version"):
        counts = summary.get("counts") or {}
        text = _fmt_counts(counts) if counts else ""
        rows.append(("dataset", f"{summary['dataset_version']}  {text}"))
        if len(counts.get("origins") or {}) > 1:
            rows.append(("sources", _fmt_origins(counts["origins"])))
    if summary.get("training"):
        rows.append(("training", _fmt_training(summary)))
    if (summary.get("features") or {}).get("images"):
        rows.append(("features", _fmt_features(summary["features"])))
    return rows


def _model_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The model, promotion and aliases rows (those the run has)."""
    rows = []
    model = summary.get("model")
    if model:
        figures = _fmt_model_figures(model)
        rows.append(("model", f"{model['name']} version {model['version']}  {figures}"))
    promotion = summary.get("promotion")
    if promotion:
        verdict = "promoted: " if promotion["promoted"] else "not promoted: "
        rows.append(("promotion", verdict + promotion["reason"]))
    aliases = summary.get("aliases")
    if aliases:
        rows.append(("aliases", ", ".join(f"{a} -> v{v}" for a, v in aliases.items())))
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The short, human summary of one run (printed by ``dandelion pipeline``)."""
    head = (
        f"dandelion pipeline: {summary.get('status', 'unknown').upper()}  "
        f"(dag {summary.get('dag_id')}, run {summary.get('run_id')})"
    )
    rows = _failure_rows(summary) + _data_rows(summary) + _model_rows(summary)
    rows += list((summary.get("look") or {}).items())
    return "\n".join([head] + [f"  {name:<10} {text}" for name, text in rows])


def model_summary(settings: Settings, trained: str | None) -> dict[str, Any]:
    """The model row (the version trained in this run, else the champion) and the aliases."""
    client = registry.configure_mlflow(settings)
    aliases: dict[str, str] = {}
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        mv = registry.get_alias_version(client, settings.tracking.model_name, alias)
        if mv is not None:
            aliases[alias] = str(mv.version)
    version = trained or aliases.get(registry.CHAMPION)
    out: dict[str, Any] = {"aliases": aliases}
    if version:
        mv = client.get_model_version(settings.tracking.model_name, version)
        out["model"] = {
            "name": settings.tracking.model_name,
            "version": str(version),
            **_test_figures(client, mv),
            "trained_in_this_run": bool(trained),
            "mlflow_run_id": mv.run_id,
        }
    return out


def _test_figures(client: Any, mv: Any) -> dict[str, float | None]:
    """The ``test_*`` headline figures (:data:`~dandelion_lib.lifecycle.scorecard.HEADLINE`)
    of a model version: its saved scores
    as served (``serving.precision``), else its training run's metrics."""
    saved = scorecard.load(client, mv.run_id) if mv.run_id else None
    if saved is not None:
        precision = (mv.tags or {}).get(SERVING_TAG + "precision") or "fp32"
        return {f"test_{k}": v for k, v in scorecard.headline(saved, precision).items()}
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return {
        f"test_{name}": float(metrics[f"test_{name}"]) if f"test_{name}" in metrics else None
        for name in scorecard.HEADLINE
    }


def read_summary(settings: Settings, trigger: str) -> dict[str, Any] | None:
    """The summary written by the run started with ``trigger`` (None when absent)."""
    store = open_store(settings=settings)
    try:
        latest = store.get_json("runs/latest")
        if latest.get("trigger") != trigger:
            return None
        summary: dict[str, Any] = store.get_json(f"{run_prefix(latest['run_id'])}summary.json")
        return summary
    except ObjectNotFoundError:
        return None
