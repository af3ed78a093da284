"""The dandelion prediction API (Litestar). ``python -m api`` serves it with uvicorn.

Handlers (``api.routes``) are thin; the logic lives in ``api.services`` and
``dandelion_lib``. See docs/api.md.
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the Litestar app (imported lazily so ``import api`` stays cheap)."""
    from api.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
