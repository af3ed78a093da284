"""The dandelion prediction API (Litestar). ``python -m api`` serves it with uvicorn.

Handlers (``api.routes``) are thin; the logic lives in ``api.services`` and
``dandelion_lib``. See docs/api.md.
"""
