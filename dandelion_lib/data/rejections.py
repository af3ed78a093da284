"""What ingestion refuses: a whole run (:class:`IngestError` and its subclasses, one line each)
or one item (a :class:`Rejection` with a reason code from :data:`REJECTION_REASONS`, listed in
the report while the rest of the source is ingested)."""

from __future__ import annotations

from dataclasses import dataclass

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import RejectReason

REJECTION_REASONS: dict[str, str] = {
    "not_found": "the source answered 404/410 (not retried)",
    "http_error": "the source answered another HTTP error, or 5xx/429 after all retries",
    "timeout": "no complete response within the per-request timeout, after all retries",
    "connection_error": "the source could not be reached, after all retries",
    "read_error": "the local file could not be read",
    **{reason.value: reason.description for reason in RejectReason},
    "label_conflict": "the same bytes appear under more than one label",
}
"""Every reason code an item can be rejected with (documented in docs/data.md)."""


class IngestError(DandelionError):
    """Ingestion could not produce a dataset version."""


class SourceUnavailableError(IngestError):
    """The source cannot be reached or read at all."""


@dataclass
class Rejection:
    """An item left out of the version, and why (``reason``: a key of REJECTION_REASONS)."""

    source: str
    label: str
    reason: str
    detail: str
