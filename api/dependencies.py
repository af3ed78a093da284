"""Dependency providers and guards: how handlers get the services, settings and admin checks.

The services are built once per app (:class:`~api.services.Services`, kept in
``app.state.services``); the providers hand the handlers the piece they name.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler

from api.metrics import ApiMetrics
from api.problems import Problem
from api.services import Services
from api.services.feedback import FeedbackService
from api.services.models import ModelManager
from api.services.predictions import PredictionService
from dandelion_lib.core.config import Settings

ADMIN_REALM = "dandelion-admin"


def services_of(state: State) -> Services:
    """The services of the app that owns ``state``."""
    services = state.services
    if not isinstance(services, Services):
        raise TypeError("app.state.services is not set; build the app with api.app.create_app")
    return services


def provide_settings(state: State) -> Settings:
    return services_of(state).settings


def provide_predictions(state: State) -> PredictionService:
    return services_of(state).predictions


def provide_feedback(state: State) -> FeedbackService:
    return services_of(state).feedback


def provide_models(state: State) -> ModelManager:
    return services_of(state).models


def provide_metrics(state: State) -> ApiMetrics:
    return services_of(state).metrics


DEPENDENCIES: dict[str, Provide] = {
    "settings": Provide(provide_settings, sync_to_thread=False),
    "predictions": Provide(provide_predictions, sync_to_thread=False),
    "feedback": Provide(provide_feedback, sync_to_thread=False),
    "models": Provide(provide_models, sync_to_thread=False),
    "metrics": Provide(provide_metrics, sync_to_thread=False),
}
"""The app-wide dependencies, by the parameter name handlers use."""


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Admit only requests with the admin bearer token (403 when none is configured)."""
    settings = services_of(connection.app.state).settings
    expected = (
        settings.serving.admin_token.get_secret_value() if settings.serving.admin_token else ""
    )
    if not expected:
        raise Problem(
            403, "admin-disabled", "admin endpoints are disabled: DANDELION_ADMIN_TOKEN is not set"
        )
    scheme, _sep, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise Problem(
            401,
            "unauthorized",
            "a valid bearer token is required",
            headers={"WWW-Authenticate": f'Bearer realm="{ADMIN_REALM}"'},
        )
