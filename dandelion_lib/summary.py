"""The run summary: what one pipeline run did, in a few lines, and where to look next."""

from __future__ import annotations

from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import run_prefix
from dandelion_lib.core.storage import ObjectNotFoundError, open_store


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


def _fmt_model_figures(model: dict[str, Any]) -> str:
    acc = model.get("test_accuracy")
    text = f"test accuracy {acc:.4f}" if isinstance(acc, float) else "no test accuracy"
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


def format_summary(summary: dict[str, Any]) -> str:
    """The short, human summary of one run (printed by ``dandelion pipeline``)."""
    lines = [
        f"dandelion pipeline: {summary.get('status', 'unknown').upper()}  "
        f"(dag {summary.get('dag_id')}, run {summary.get('run_id')})"
    ]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<10} {text}")

    for failure in summary.get("failures", []):
        row("failed", f"{failure['task_id']}: {failure['error']}")
        if failure.get("notebook"):
            row("", f"executed notebook: {failure['notebook']}")
    if summary.get("dataset_version"):
        counts = summary.get("counts") or {}
        row("dataset", f"{summary['dataset_version']}  {_fmt_counts(counts) if counts else ''}")
    if summary.get("training"):
        row("training", _fmt_training(summary))
    if (summary.get("features") or {}).get("images"):
        row("features", _fmt_features(summary["features"]))
    model = summary.get("model")
    if model:
        row("model", f"{model['name']} version {model['version']}  {_fmt_model_figures(model)}")
    promotion = summary.get("promotion")
    if promotion:
        row(
            "promotion",
            ("promoted: " if promotion["promoted"] else "not promoted: ") + promotion["reason"],
        )
    aliases = summary.get("aliases")
    if aliases:
        row("aliases", ", ".join(f"{a} -> v{v}" for a, v in aliases.items()) or "none")
    for name, text in (summary.get("look") or {}).items():
        row(name, text)
    return "\n".join(lines)


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
