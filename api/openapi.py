"""OpenAPI details the handlers cannot infer: raw/multipart request bodies, problem responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType

from api.problems import PROBLEM_MEDIA_TYPE
from api.schemas import ProblemDetail

_BINARY = Schema(type=OpenAPIType.STRING, format="binary")  # type: ignore[arg-type]


def _multipart(
    field: str, *, many: bool, extra: dict[str, Schema] | None = None
) -> OpenAPIMediaType:
    file_schema = Schema(type=OpenAPIType.ARRAY, items=_BINARY, min_items=1) if many else _BINARY
    props: dict[str, Any] = {field: file_schema, **(extra or {})}
    return OpenAPIMediaType(
        schema=Schema(type=OpenAPIType.OBJECT, properties=props, required=[field, *(extra or {})])
    )


def operation_with_body(content: dict[str, OpenAPIMediaType], description: str) -> type[Operation]:
    """An ``Operation`` subclass documenting a request body the handler reads by hand."""

    @dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(content=content, description=description, required=True)

    return _Operation


PREDICT_OPERATION = operation_with_body(
    {
        "multipart/form-data": _multipart("file", many=False),
        "image/jpeg": OpenAPIMediaType(schema=_BINARY),
        "image/png": OpenAPIMediaType(schema=_BINARY),
        "image/webp": OpenAPIMediaType(schema=_BINARY),
        "application/octet-stream": OpenAPIMediaType(schema=_BINARY),
    },
    "One image: multipart field `file`, or the raw bytes with an `image/*` content type.",
)

BATCH_OPERATION = operation_with_body(
    {"multipart/form-data": _multipart("files", many=True)},
    "Several images, each in multipart field `files` (repeated).",
)

_LABEL = Schema(
    type=OpenAPIType.STRING,
    description="One of the training labels (DANDELION_LABELS), or `neither` when the photo "
    "shows neither class; never `uncertain` or `unknown`.",
)
_ID = Schema(type=OpenAPIType.STRING, format="uuid")  # type: ignore[arg-type]

FEEDBACK_OPERATION = operation_with_body(
    {
        "application/json": OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.OBJECT,
                properties={"prediction_id": _ID, "correct_label": _LABEL},
                required=["prediction_id", "correct_label"],
                additional_properties=False,
            )
        ),
        "multipart/form-data": OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.OBJECT,
                properties={"prediction_id": _ID, "correct_label": _LABEL, "image": _BINARY},
                required=["prediction_id", "correct_label"],
            )
        ),
    },
    "The prediction id returned by /predict and the correct label; optionally the image "
    "(multipart field `image`, the same bytes that were predicted).",
)


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` entries for problem+json answers."""
    return {
        s: ResponseSpec(
            data_container=ProblemDetail,
            media_type=PROBLEM_MEDIA_TYPE,
            description="Problem details (RFC 9457)",
            generate_examples=False,
        )
        for s in statuses
    }
