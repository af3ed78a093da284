"""``python -m api``: serve the API with uvicorn on the configured host and port."""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import uvicorn

    from api.app import create_app
    from api.logs import configure_logging
    from api.services.models import registry_http_env
    from api.transport import protocol_with_limits
    from dandelion_lib.core.config import cpu_limit, get_settings

    settings = get_settings()
    # Before MLflow makes its first request; a value set in the environment wins.
    for key, value in registry_http_env(settings).items():
        os.environ.setdefault(key, value)
    # Before TensorFlow starts: its thread pools follow the container's CPU limit, not the
    # host's cores (an oversubscribed quota is throttled).
    threads = settings.serving.inference_threads or cpu_limit()
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(min(2, threads)))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    configure_logging(settings.serving.log_level)
    uvicorn.run(
        create_app(settings),
        # Header deadline and connection limits, refused in problem+json (api/transport.py).
        http=protocol_with_limits(
            settings.serving.header_timeout_s,
            settings.serving.api_max_connections,
            settings.serving.api_max_connections_per_client,
        ),
        host=settings.serving.api_host,
        port=settings.serving.api_port,
        workers=1,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=20,
        # Idle keep-alive connections are closed after 5 s; request bodies are bounded by
        # api.middleware.BodyDeadlineMiddleware (uvicorn has no body read timeout).
        timeout_keep_alive=5,
    )


if __name__ == "__main__":
    main()
