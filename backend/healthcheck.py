"""Container health probe: `python -m backend.healthcheck` exits 0 when /health answers UP.

Docker's HEALTHCHECK runs this inside the container. It reads the same environment as the
server (PORT, BASIC_AUTH_USER/BASIC_AUTH_PASS), so the probe keeps working when basic auth
protects every route.
"""

from __future__ import annotations

import os
import sys

import requests

from backend.settings import Settings


def probe(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, what was seen) for the server described by `settings` on this host."""
    auth = None
    if settings.basic_auth_user and settings.basic_auth_pass:
        auth = (settings.basic_auth_user, settings.basic_auth_pass)
    url = f"http://127.0.0.1:{settings.port}/health"
    try:
        response = requests.get(url, auth=auth, timeout=timeout)
    except requests.RequestException as e:
        return False, f"{url}: {type(e).__name__}"
    if response.status_code != 200:
        return False, f"{url}: HTTP {response.status_code}"
    try:
        status = response.json().get("status")
    except ValueError:
        return False, f"{url}: not JSON"
    return status == "UP", f"{url}: status {status!r}"


def main() -> int:
    healthy, seen = probe(Settings.from_env(os.environ))
    print(("healthy: " if healthy else "unhealthy: ") + seen, file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
