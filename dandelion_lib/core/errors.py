"""Base error class: anything a user can fix, reported as one line (no stack trace)."""


class DandelionError(Exception):
    """An error whose message is a complete, user-facing sentence."""
