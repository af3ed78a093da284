"""Container health probe: exit 0 when the URL answers 2xx, else 1 (stdlib only).

Used by the images' HEALTHCHECK and by compose, as the slim base images ship no curl.
Usage: python /usr/local/bin/dandelion-healthcheck http://127.0.0.1:8000/health/live
"""

from __future__ import annotations

import sys
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000/health/live"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if 200 <= response.status < 300 else 1
    except Exception as exc:  # any failure is "unhealthy"
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
