"""Drivers of the container checks: `nox -s images` (build + run every image) and
`nox -s rehearse` (the whole stack under docker compose). See docs/deployment.md."""
