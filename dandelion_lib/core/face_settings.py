"""Settings groups of the faces: the prediction API (serving), user feedback, drift
monitoring, the web app and the reviewer page; and the base of every group.

"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsGroup(BaseSettings):
    """A group of settings; each field is read from ``DANDELION_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="DANDELION_", env_file=".env", extra="ignore", frozen=True
    )


class ServingSettings(SettingsGroup):
    """The prediction API: model, runtime, answers, limits and timeouts."""

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
        description="Open connections before the API answers 503 too-many-connections (with "
        "Retry-After) and closes the next one.",
    )
    api_max_connections_per_client: int = Field(
        50,
        gt=0,
        description="Open connections from one peer address before the API answers 503 "
        "too-many-client-connections (with Retry-After) and closes the next one. Behind the "
        "Kubernetes ingress the peer is the ingress controller, so the ingress's own limit "
        "(limit-connections: 20 per client address) applies there and this is set to "
        "api_max_connections.",
    )
    decode_budget_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Bytes the images being decoded at once may take, each counted at its "
        "worst case from its header; past it 503 decode-busy with Retry-After, and an image "
        "whose worst case alone exceeds it 413. Sized from the 1 GiB container limit: the "
        "API serving FP32 under load takes ~600 MiB, leaving ~420 MiB; 256 MiB keeps headroom.",
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
        15.0,
        gt=0,
        le=15.0,
        description="Deadline of POST /admin/reload; past it 503 reload-timeout (the check "
        "goes on; GET /model shows its outcome). At most 15 s, so that it ends within the "
        "API's 20 s graceful shutdown with time to spare; a reload in flight when shutdown "
        "starts answers 503 shutting-down at once.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin/*; admin endpoints are refused when unset."
    )
    log_level: str = Field("INFO", description="Log level of the API's JSON logs.")
    inference_threads: int | None = Field(
        None,
        gt=0,
        description="Intra-op threads of the API's model runtime. Default: the container's CPU "
        "limit (cgroup quota, rounded up), else the CPUs this process may run on.",
    )
    int8_recheck_margin: float = Field(
        1.5,
        ge=0,
        description="INT8 served: a photo whose open-set score INT8 puts within this of the "
        "threshold (logits) is run again in FP32 and answered by FP32. INT8 moved the score "
        "by at most 1.21 logits on 700 photos (docs/model.md), so the answers near the "
        "boundary are FP32's (0: no recheck, and no FP32 session loaded beside INT8).",
    )
    int8_recheck_confidence_margin: float = Field(
        0.15,
        ge=0,
        description="INT8 served: a photo whose confidence INT8 puts within this of "
        "confidence_threshold is run again in FP32 too.",
    )
    inference_batch_max: int = Field(
        8,
        gt=0,
        description="Most images one ONNX Runtime call runs; a larger micro-batch runs in "
        "chunks of this size. The runtime's memory arena keeps the peak of the largest batch "
        "it has run, and on CPUs a batch past 8 is no faster per image (docs/model.md).",
    )


class FeedbackSettings(SettingsGroup):
    """User feedback: its database and live accuracy."""

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
    feedback_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback DB. Default: SQLite in workdir."
    )
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


class MonitoringSettings(SettingsGroup):
    """Drift monitoring, live and offline."""

    drift_window: int = Field(200, description="Served images kept for live drift scores.")
    drift_psi_threshold: float = Field(
        0.2, description="PSI above which a feature counts as drifted (if also above noise)."
    )
    drift_share_threshold: float = Field(
        0.5, description="Share of drifted features at or above which a batch has drifted."
    )
    drift_min_images: int = Field(20, description="Fewest images an offline drift check accepts.")


class AppSettings(SettingsGroup):
    """The web app (Voila)."""

    app_host: str = Field("127.0.0.1", description="Web app (Voila) bind address.")
    app_port: int = Field(8866, description="Web app (Voila) port.")
    app_max_kernels: int = Field(
        10,
        description="Concurrent app sessions (one ~90 MB kernel each); more get the queue page "
        "(HTTP 503, retrying by itself).",
    )
    app_cull_idle_s: int = Field(
        900, description="Shut down an app session's kernel after this many idle seconds."
    )
    app_max_kernels_per_visitor: int = Field(
        3,
        ge=1,
        description="App sessions one visitor (one browser) may hold; more get the queue page.",
    )
    app_connect_timeout_s: int = Field(
        60,
        ge=1,
        description="Shut down an app kernel whose page has not connected this many seconds "
        "after rendering (a client that is not a browser).",
    )
    app_health_interval_s: float = Field(
        5.0, description="How often the app re-checks the API (banner and recovery)."
    )
    app_request_timeout_s: float = Field(30.0, description="App-to-API request timeout.")
    app_max_upload_bytes: int = Field(
        64 * 1024 * 1024, description="Largest upload to the app (all files picked at once)."
    )


class ReviewSettings(SettingsGroup):
    """The reviewer page (Voila)."""

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
