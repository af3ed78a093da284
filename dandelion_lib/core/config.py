"""One typed settings object for every part of dandelion.

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
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_LABELS: tuple[str, ...] = ("dandelion", "grass")
"""Training labels, in class-index order (the default of ``DANDELION_LABELS``)."""

UNCERTAIN = "uncertain"
"""Answer given below the confidence threshold; never a training label."""

UNKNOWN = "unknown"
"""Answer for a photo that is neither class (out of domain); never a training label. It is
also the manifest label of the ``negatives`` source: out-of-domain photos the open-set
detector is fitted on."""

NEITHER = "neither"
"""Feedback label: the photo shows neither class (after review, a negative example)."""

DEFAULT_SOURCE = "https://raw.githubusercontent.com/btphan95/greenr-airflow/refs/heads/master/data"


class Settings(BaseSettings):
    """All configuration; see docs/configuration.md for the full table."""

    model_config = SettingsConfigDict(
        env_prefix="DANDELION_", env_file=".env", extra="ignore", frozen=True
    )

    # --- locations -------------------------------------------------------------------------
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
    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI. Default: sqlite:///<workdir>/mlflow.db."
    )

    # --- ingestion -------------------------------------------------------------------------
    source: str = Field(
        DEFAULT_SOURCE,
        description="Image source: an HTTP base URL (<label>/<8-digit index>.jpg) or a local "
        "folder with one sub-folder per label.",
    )
    negatives_source: str | None = Field(
        None,
        description="Out-of-domain photos (neither class) ingested as the `negatives` source: a "
        "local folder with one sub-folder per kind (e.g. daisy/, objects/). The open-set "
        "detector is fitted on them; unset: no negatives (a distance-only detector).",
    )
    ingest_feedback: bool = Field(
        True,
        description="Ingestion adds accepted feedback images (`dandelion feedback review "
        "--accept`) under the label the user gave; `neither` becomes a negative.",
    )
    labels: tuple[str, ...] = Field(
        DEFAULT_LABELS,
        description='Class labels, in model output order (env: JSON list, e.g. \'["dandelion","grass"]\').',
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
    max_download_bytes: int = Field(50 * 1024 * 1024, description="Larger downloads are rejected.")
    min_image_side: int = Field(32, description="Smaller images are rejected.")
    max_image_pixels: int = Field(
        40_000_000, description="Larger images are rejected (decompression-bomb guard)."
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

    # --- training --------------------------------------------------------------------------
    feature_cache: bool = Field(
        True,
        description="Training reads the frozen backbone's embeddings from the feature store "
        "(features/ in the object store) and computes and stores only the missing ones; "
        "false: every embedding is computed and nothing is stored.",
    )
    feature_shard_size: int = Field(
        256,
        ge=1,
        description="Images per embedding-extraction task of the training DAGs (extract_features "
        "is mapped over shards of the dataset version of this size, one task each).",
    )

    # --- model registry --------------------------------------------------------------------
    experiment: str = Field("dandelion", description="MLflow experiment name.")
    model_name: str = Field("dandelion", description="Registered model name.")
    promotion_floor: float = Field(0.90, description="Minimum test accuracy to promote.")
    promotion_tolerance: float = Field(
        0.01, description="Allowed accuracy drop versus the current champion."
    )
    extraction_runtime: Literal["auto", "keras"] = Field(
        "auto",
        description="What extracts the frozen backbone's features in training: 'auto' = ONNX "
        "Runtime when it matches TensorFlow within 1e-4 on the first batch, else TensorFlow; "
        "'keras' = always TensorFlow.",
    )
    int8_tolerance: float = Field(
        0.01,
        ge=0,
        description="INT8 is served only if its test accuracy, ROC AUC and out-of-domain "
        "'unknown' share are each within this of FP32's; otherwise FP32 is served.",
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
    benchmark_dataset_version: str | None = Field(
        None,
        description="Dataset version whose test split is promotion's frozen benchmark "
        "(logged beside the new version's test split). Default: the store's first version "
        "(pointer datasets/benchmark).",
    )

    # --- orchestration (Airflow) -----------------------------------------------------------
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

    # --- serving ---------------------------------------------------------------------------
    api_url: str = Field("http://127.0.0.1:8000", description="Where clients reach the API.")
    api_host: str = Field("127.0.0.1", description="API bind address.")
    api_port: int = Field(8000, description="API port.")
    model_alias: str = Field("champion", description="Alias the API serves.")
    serving_runtime: Literal["auto", "onnx", "keras"] = Field(
        "auto",
        description="How the Predictor runs a model: 'auto' = the version's ONNX Runtime "
        "artifact in the precision the gate chose, Keras when the version has none or it "
        "cannot be loaded; 'onnx' = that artifact or an error; 'keras' = always Keras.",
    )
    confidence_threshold: float = Field(
        0.6, description="Below this confidence the answer is 'uncertain'."
    )
    max_body_bytes: int = Field(10 * 1024 * 1024, description="Request body limit.")
    body_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Grace period for a request body; after it the body must keep arriving "
        "at min_upload_bytes_per_s, else 408 and the connection is closed.",
    )
    min_upload_bytes_per_s: int = Field(
        1024, ge=0, description="Slowest average upload rate accepted after the grace period."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers, else 408 and the "
        "connection is closed.",
    )
    api_max_connections: int = Field(
        1000,
        gt=0,
        description="Open connections and requests in flight before the API answers 503.",
    )
    max_batch_images: int = Field(32, description="Images per /predict/batch request.")
    microbatch_max: int = Field(32, description="Largest micro-batch run by the model.")
    microbatch_wait_ms: float = Field(5.0, description="Wait for more requests to batch.")
    queue_size: int = Field(256, description="Pending images before 503 + Retry-After.")
    reload_interval_s: float = Field(30.0, description="Registry alias polling period.")
    registry_timeout_s: int = Field(
        10,
        gt=0,
        description="Per-request timeout of the API's registry calls (MLflow HTTP), so a down "
        "or hanging registry is named in seconds, not minutes.",
    )
    registry_retries: int = Field(
        1, ge=0, description="Retries of one registry request by the API (MLflow HTTP)."
    )
    reload_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of POST /admin/reload; past it 503 reload-timeout (the check "
        "goes on; GET /model shows its outcome).",
    )
    feedback_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Deadline of a feedback request's database and object-store work, and the "
        "database's lock and connect wait (SQLite busy timeout; PostgreSQL connect, pool and "
        "statement timeouts). Past it: 503 feedback-timeout with Retry-After.",
    )
    feedback_concurrency: int = Field(
        4,
        gt=0,
        description="Feedback requests served at once (their own threads, apart from "
        "predictions); one more answers 503 feedback-busy at once.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin/*; admin endpoints are refused when unset."
    )
    feedback_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback DB. Default: SQLite in workdir."
    )
    drift_window: int = Field(200, description="Served images kept for live drift scores.")
    feedback_accuracy_window: int = Field(
        200, description="Latest feedback items behind the live accuracy gauge."
    )
    live_accuracy_floor: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Live accuracy below which the alert DandelionLiveAccuracyLow fires "
        "(exported as dandelion_live_accuracy_floor).",
    )
    log_level: str = Field("INFO", description="Log level of the API's JSON logs.")
    inference_threads: int | None = Field(
        None,
        gt=0,
        description="Intra-op threads of the API's model runtime. Default: the container's CPU "
        "limit (cgroup quota, rounded up), else the CPUs this process may run on.",
    )
    inference_batch_max: int = Field(
        8,
        gt=0,
        description="Most images one ONNX Runtime call runs; a larger micro-batch runs in "
        "chunks of this size. The runtime's memory arena keeps the peak of the largest batch "
        "it has run, and on CPUs a batch past 8 is no faster per image (docs/model.md).",
    )

    # --- monitoring ------------------------------------------------------------------------
    drift_psi_threshold: float = Field(
        0.2, description="PSI above which a feature counts as drifted (if also above noise)."
    )
    drift_share_threshold: float = Field(
        0.5, description="Share of drifted features at or above which a batch has drifted."
    )
    drift_min_images: int = Field(20, description="Fewest images an offline drift check accepts.")

    # --- web app ---------------------------------------------------------------------------
    app_host: str = Field("127.0.0.1", description="Web app (Voila) bind address.")
    app_port: int = Field(8866, description="Web app (Voila) port.")
    app_max_kernels: int = Field(
        10, description="Concurrent app sessions (one ~90 MB kernel each); more get HTTP 503."
    )
    app_cull_idle_s: int = Field(
        900, description="Shut down an app session's kernel after this many idle seconds."
    )
    app_health_interval_s: float = Field(
        5.0, description="How often the app re-checks the API (banner and recovery)."
    )
    app_request_timeout_s: float = Field(30.0, description="App-to-API request timeout.")
    app_max_upload_bytes: int = Field(
        64 * 1024 * 1024, description="Largest upload to the app (all files picked at once)."
    )

    # --- reviewer page ---------------------------------------------------------------------
    review_host: str = Field(
        "127.0.0.1",
        description="Reviewer page (Voila) bind address; never behind the public ingress.",
    )
    review_port: int = Field(8867, description="Reviewer page (Voila) port.")
    review_token: SecretStr | None = Field(
        None,
        description="Token reviewers open the reviewer page with (`/?token=...`, at least 16 "
        "characters); the page refuses to start when unset.",
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError("labels must be at least two distinct names")
        bad = [lab for lab in labels if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", lab)]
        if bad:
            raise ValueError(f"labels must be lower-case names ([a-z0-9_-]): {bad}")
        return labels

    # --- derived ---------------------------------------------------------------------------
    @property
    def workdir_path(self) -> Path:
        return self.workdir.expanduser().resolve()

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.workdir_path / "store").as_uri()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    @property
    def resolved_airflow_home(self) -> Path:
        return (self.airflow_home or self.workdir_path / "airflow").expanduser().resolve()

    @property
    def resolved_notebooks_dir(self) -> Path:
        default = Path(__file__).resolve().parents[1] / "notebooks"
        return (self.notebooks_dir or default).expanduser().resolve()

    @property
    def resolved_feedback_db_url(self) -> str:
        return self.feedback_db_url or f"sqlite:///{self.workdir_path / 'feedback.db'}"


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
