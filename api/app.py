"""The Litestar application: wiring of settings, services, handlers and error handling."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from api.dependencies import DEPENDENCIES
from api.middleware import BodyDeadlineMiddleware, RequestContextMiddleware
from api.problems import Problem, from_exception, problem_response
from api.routes import ROUTES
from api.services import Services
from api.services.models import redact_uri
from dandelion_lib import __version__
from dandelion_lib.core.config import Settings

log = logging.getLogger("api")

INPUT_STATUSES = frozenset({400, 413, 415, 422})


def create_app(settings: Settings, *, services: Services | None = None) -> Litestar:
    """Build the API on ``settings`` (``python -m api`` reads them from the environment).
    ``services`` lets tests inject prepared services (default: built from ``settings``)."""
    svc = services or Services.build(settings)

    def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        problem: Problem = from_exception(exc, max_body_bytes=settings.serving.max_body_bytes)
        if problem.status in INPUT_STATUSES:
            svc.metrics.count_invalid(problem.code)
        return problem_response(problem, request)

    def on_startup() -> None:
        svc.start()
        log.info(
            "api started",
            extra={
                "model": f"models:/{settings.tracking.model_name}@{settings.serving.model_alias}",
                "tracking_uri": redact_uri(settings.resolved_tracking_uri),
                "microbatch_max": settings.serving.microbatch_max,
                "queue_size": settings.serving.queue_size,
            },
        )

    def on_shutdown() -> None:
        svc.stop()

    app = Litestar(
        route_handlers=ROUTES,
        dependencies=DEPENDENCIES,
        state=State({"services": svc}),
        exception_handlers={Exception: handle_exception},
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        openapi_config=OpenAPIConfig(
            title="dandelion API",
            version=__version__,
            description="Classifies photos as dandelion or grass. Errors are RFC 9457 "
            "problem details (application/problem+json).",
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        request_max_body_size=settings.serving.max_body_bytes,
        multipart_form_part_limit=settings.serving.max_batch_images + 16,
        logging_config=None,
        debug=False,
    )
    # Outermost layer (also sees requests that match no route).
    app.asgi_handler = RequestContextMiddleware(
        BodyDeadlineMiddleware(
            app.asgi_handler,
            settings.serving.body_read_timeout_s,
            settings.serving.min_upload_bytes_per_s,
        ),
        svc.metrics,
    )
    return app
