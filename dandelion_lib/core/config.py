"""Typed settings for every part of dandelion, in groups.

Values come from environment variables prefixed ``DANDELION_`` (or a ``.env`` file),
falling back to the embedded defaults below, which run everything on one machine:
a local object store and SQLite-backed MLflow under the work directory.

S3 credentials are never settings: boto3 reads them from its standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, or an IAM role).
"""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dandelion_lib.core.face_settings import (
    AppSettings,
    FeedbackSettings,
    MonitoringSettings,
    ReviewSettings,
    ServingSettings,
    SettingsGroup,
)
from dandelion_lib.core.labels import DEFAULT_LABELS

DEFAULT_SOURCE = "https://raw.githubusercontent.com/btphan95/greenr-airflow/refs/heads/master/data"


class StorageSettings(SettingsGroup):
    """Where state lives: the work directory and the object store."""

    workdir: Path = Field(Path(".dandelion"), description="Embedded state: store, MLflow DB.")
    store_url: str | None = Field(
        None,
        description="Object store: file:///path or s3://bucket[/prefix]. "
        "Default: file://<workdir>/store.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO or another S3-compatible server."
    )
    s3_region: str = Field("us-east-1", description="S3 region name.")


class TrackingSettings(SettingsGroup):
    """MLflow tracking and the model registry."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI. Default: sqlite:///<workdir>/mlflow.db."
    )
    experiment: str = Field("dandelion", description="MLflow experiment name.")
    model_name: str = Field("dandelion", description="Registered model name.")


class IngestSettings(SettingsGroup):
    """Ingestion: sources, downloads, dataset quality gates and splits."""

    source: str = Field(
        DEFAULT_SOURCE,
        description="Labelled image sources, comma-separated, each an HTTP base URL "
        "(<label>/<8-digit index>.jpg), a bucket `s3://bucket/prefix` (<prefix>/<label>/<file>) "
        "or a local folder with one sub-folder per label, optionally named `name=spec` (e.g. "
        "`greenr-url-or-folder,mine=/photos/lawn`). Each image records its source's name "
        "(`origin` in the manifest); unnamed: a folder's basename, `greenr` for the default "
        "URL, another URL's last path segment (a bucket's prefix's last part, or the bucket). "
        "Names must be unique; splits are stratified by source and class.",
    )
    negatives_source: str | None = Field(
        None,
        description="Out-of-domain photos (neither class) ingested as the `negatives` source: a "
        "local folder with one sub-folder per kind (e.g. daisy/, objects/), or a bucket "
        "`s3://bucket/prefix` with one key prefix per kind. The open-set "
        "detector is fitted on them; unset: no negatives (a distance-only detector).",
    )
    ingest_feedback: bool = Field(
        True,
        description="Ingestion adds accepted feedback images (`dandelion feedback review "
        "--accept`) under the label the user gave; `neither` becomes a negative.",
    )
    source_start: int = Field(0, description="First image index of the HTTP layout.")
    source_count: int = Field(200, description="Images per label in the HTTP layout.")
    max_per_class: int | None = Field(
        None,
        description="Take at most this many images per label (first in source order); unset: all.",
    )
    http_concurrency: int = Field(16, description="Parallel downloads.")
    http_timeout_s: float = Field(10.0, description="Per-request timeout (whole response).")
    http_retries: int = Field(3, description="Retries on 5xx and timeouts (never on 404).")
    http_backoff_s: float = Field(
        0.5, description="First retry delay; doubles on each further retry."
    )
    min_images_per_class: int = Field(20, description="Ingestion fails below this per class.")
    max_class_imbalance: float = Field(
        3.0, description="Ingestion fails when largest/smallest class count exceeds this."
    )
    near_duplicate_distance: int = Field(
        8,
        description="Images whose 64-bit perceptual hashes differ in at most this many bits "
        "are near-duplicates (kept in one split); -1 disables grouping.",
    )
    split_seed: int = Field(42, description="Seed of the deterministic train/val/test split.")


class ImageSettings(SettingsGroup):
    """What image is acceptable: the limits every face applies."""

    max_download_bytes: int = Field(50 * 1024 * 1024, description="Larger downloads are rejected.")
    min_image_side: int = Field(32, description="Smaller images are rejected.")
    max_image_pixels: int = Field(
        32_000_000,
        gt=0,
        description="Larger images are rejected, from their header before decoding "
        "(decompression-bomb guard). Derived from the model input (352 px): JPEG decodes at "
        "1/8 scale at most, and a side past 2 x 8 x 352 = 5,632 px decodes at more than twice "
        "the input even then; 5,632 squared is 31.7 M pixels, rounded up.",
    )


class TrainingSettings(SettingsGroup):
    """Training: the feature store and feature extraction."""

    feature_cache: bool = Field(
        True,
        description="Training reads the frozen backbone's embeddings from the feature store "
        "(features/ in the object store) and computes and stores only the missing ones; "
        "false: every embedding is computed and nothing is stored.",
    )
    feature_shard_size: int = Field(
        256,
        ge=1,
        description="Images per shard of embedding extraction in the training DAGs "
        "(extract_features is mapped over groups of shards of the dataset version of this "
        "size; see feature_max_tasks).",
    )
    feature_max_tasks: int = Field(
        256,
        ge=1,
        description="At most this many mapped extract_features tasks per DAG run; a larger "
        "dataset version gives each task several consecutive shards. Airflow refuses to map "
        "more than its max_map_length (1,024 by default) tasks: 256 stays under it at any "
        "size, with room for parallelism (a million images: 3,907 shards, 15 or 16 per task).",
    )
    extraction_runtime: Literal["auto", "keras"] = Field(
        "auto",
        description="What extracts the frozen backbone's features in training: 'auto' = ONNX "
        "Runtime when it matches TensorFlow within 1e-4 on the first batch, else TensorFlow; "
        "'keras' = always TensorFlow.",
    )


class PromotionSettings(SettingsGroup):
    """The promotion gate and the served precision."""

    promotion_floor: float = Field(0.90, description="Minimum test accuracy to promote.")
    promotion_tolerance: float = Field(
        0.01, description="Allowed accuracy drop versus the current champion."
    )
    int8_tolerance: float = Field(
        0.01,
        ge=0,
        description="INT8 is served only if its test accuracy, ROC AUC and out-of-domain "
        "'unknown' share are each within this of FP32's, or, when its agreement with FP32 "
        "was measured, within max(this, 1.5 / n) for a figure over n test photos (one photo "
        "answered differently never decides); otherwise FP32 is served.",
    )
    int8_min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="INT8 is served only if the one-sided 95 % Wilson lower bound of the share "
        "of photos it answers as FP32 reaches this (all splits and the negatives of the dataset "
        "version; with 900 photos at most 4 may differ; under 268 photos 0.99 cannot be "
        "reached and FP32 is served).",
    )
    int8_max_probability_diff: float = Field(
        0.1,
        ge=0,
        le=1,
        description="INT8 is served only if none of its probabilities differs from FP32's by "
        "more than this on the photos compared for agreement that FP32 does not answer "
        "'unknown' (a photo that is neither class has no meaningful class probabilities).",
    )
    int8_agreement_photos: int = Field(
        1000,
        ge=0,
        description="Most photos INT8 and FP32 are compared on (the test split first, then the "
        "negatives, the validation and the training split).",
    )
    int8_calibration_images: int = Field(
        100,
        ge=0,
        description="Training images that calibrate the INT8 runtime artifact at registration "
        "(0: no INT8 artifact).",
    )
    promotion_ood_tolerance: float = Field(
        0.05,
        description="Allowed drop of the share of out-of-domain test photos answered 'unknown' "
        "versus the current champion.",
    )
    promotion_max_source_unknown: float = Field(
        0.03,
        ge=0,
        le=1,
        description="Highest share of any labelled source's test photos the challenger may "
        "answer 'unknown' (from 2 photos on); above it the challenger is not promoted.",
    )
    promotion_right_answers_tolerance: float = Field(
        0.01,
        ge=0,
        description="Allowed drop of right answers (test photos whose answer is their true "
        "label) versus the current champion.",
    )
    benchmark_dataset_version: str | None = Field(
        None,
        description="Dataset version whose test split is promotion's frozen benchmark "
        "(logged beside the new version's test split). Default: the store's first version "
        "(pointer datasets/benchmark).",
    )


class OrchestrationSettings(SettingsGroup):
    """The pipeline: notebooks, Airflow, retraining triggers."""

    notebooks_dir: Path | None = Field(
        None, description="Notebooks the pipeline runs. Default: the project's notebooks/ folder."
    )
    kernel_name: str = Field("dandelion", description="Jupyter kernel the notebooks run in.")
    airflow_home: Path | None = Field(
        None, description="AIRFLOW_HOME of the embedded pipeline. Default: <workdir>/airflow."
    )
    pipeline_retries: int = Field(
        2, description="Retries of the pipeline's I/O steps (never of a failed quality gate)."
    )
    pipeline_retry_delay_s: float = Field(
        10.0, description="First retry delay of a pipeline step; doubles on each retry."
    )
    retrain_cron: str = Field(
        "0 3 * * 1", description="Weekly retraining schedule (cron, UTC) besides new datasets."
    )
    retrain_feedback_threshold: int = Field(
        20,
        ge=1,
        description="Accepted feedback photos not yet in a dataset version that trigger "
        "retraining (checked by the dandelion_feedback DAG).",
    )
    feedback_watch_cron: str = Field(
        "*/30 * * * *",
        description="How often the dandelion_feedback DAG counts accepted feedback (cron, UTC).",
    )


GROUPS: dict[str, type[SettingsGroup]] = {
    "storage": StorageSettings,
    "tracking": TrackingSettings,
    "ingest": IngestSettings,
    "images": ImageSettings,
    "training": TrainingSettings,
    "promotion": PromotionSettings,
    "orchestration": OrchestrationSettings,
    "serving": ServingSettings,
    "feedback": FeedbackSettings,
    "monitoring": MonitoringSettings,
    "app": AppSettings,
    "review": ReviewSettings,
}
"""Each group's attribute name on :class:`Settings` and its class."""


class Settings(BaseSettings):
    """All configuration, in typed groups (``settings.storage.store_url``,
    ``settings.serving.confidence_threshold``...); see docs/configuration.md for the table.

    Environment variables stay flat (``DANDELION_STORE_URL``), and so do the names accepted by
    the constructor and :meth:`updated` (``Settings(workdir=...)``): each is routed to its group.
    """

    model_config = SettingsConfigDict(
        env_prefix="DANDELION_", env_file=".env", extra="ignore", frozen=True
    )

    labels: tuple[str, ...] = Field(
        DEFAULT_LABELS,
        description='Class labels, in model output order (env: JSON list, e.g. \'["dandelion","grass"]\').',
    )
    storage: StorageSettings = Field(default_factory=StorageSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    app: AppSettings = Field(default_factory=AppSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_names(cls, data: Any) -> Any:
        """``Settings(store_url=...)``: each flat field name goes to its group."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for group, model in GROUPS.items():
            flat = {k: data.pop(k) for k in list(data) if k in model.model_fields}
            if not flat:
                continue
            given = data.get(group)
            base = given.model_dump() if isinstance(given, BaseModel) else dict(given or {})
            data[group] = model(**(base | flat))
        return data

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (``{"store_url": ..., "split_seed": ...}``)."""
        out: dict[str, Any] = {"labels": self.labels}
        for group in GROUPS:
            out |= getattr(self, group).model_dump()
        return out

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (flat field names, validated), e.g. ``updated(split_seed=1)``."""
        data: dict[str, Any] = {"labels": self.labels}
        data |= {group: getattr(self, group).model_dump() for group in GROUPS}
        return Settings(**(data | changes))

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError("labels must be at least two distinct names")
        bad = [lab for lab in labels if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", lab)]
        if bad:
            raise ValueError(f"labels must be lower-case names ([a-z0-9_-]): {bad}")
        return labels

    @property
    def workdir_path(self) -> Path:
        return self.storage.workdir.expanduser().resolve()

    @property
    def resolved_store_url(self) -> str:
        return self.storage.store_url or (self.workdir_path / "store").as_uri()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    @property
    def resolved_airflow_home(self) -> Path:
        return (
            (self.orchestration.airflow_home or self.workdir_path / "airflow")
            .expanduser()
            .resolve()
        )

    @property
    def resolved_notebooks_dir(self) -> Path:
        default = Path(__file__).resolve().parents[1] / "notebooks"
        return (self.orchestration.notebooks_dir or default).expanduser().resolve()

    @property
    def resolved_feedback_db_url(self) -> str:
        return self.feedback.feedback_db_url or f"sqlite:///{self.workdir_path / 'feedback.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup CPU quota (a container's limit), rounded up,
    else the CPUs it may be scheduled on. In a container the host's core count
    (``os.cpu_count()``) overstates it, and thread pools sized by it oversubscribe the quota.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    available = max(1, cpus or 1)
    quota: float | None = None
    v2 = cgroup_root / "cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
    v1 = cgroup_root / "cpu" / "cpu.cfs_quota_us"
    try:
        if v2.is_file():
            limit, period = v2.read_text().split()[:2]
            if limit != "max":
                quota = int(limit) / int(period)
        elif v1.is_file():
            limit_us = int(v1.read_text().strip())
            period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text().strip())
            if limit_us > 0:
                quota = limit_us / period_us
    except (OSError, ValueError):
        quota = None
    if quota is None or quota <= 0:
        return available
    return max(1, min(available, math.ceil(quota)))
