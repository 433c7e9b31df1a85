"""`python -m backend.healthcheck` (the Docker HEALTHCHECK) against the real server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_process import ROOT, free_port, running_server


def probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.healthcheck"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """A real server behind basic auth; yields the environment it was started with."""
    env = {
        **os.environ,
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "BASIC_AUTH_USER": "probe",
        "BASIC_AUTH_PASS": "s3cret pass",
        "THREADS": "2",
    }
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    log_path = tmp_path_factory.mktemp("healthcheck") / "server.log"
    with running_server(env, log_path):
        yield env


def test_healthy_server_with_the_right_credentials(server_env):
    done = probe(server_env)
    assert done.returncode == 0, done.stderr
    assert "healthy:" in done.stderr and "status 'UP'" in done.stderr
    assert "s3cret" not in done.stderr


def test_wrong_credentials_are_unhealthy(server_env):
    done = probe({**server_env, "BASIC_AUTH_PASS": "wrong"})
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr


def test_no_server_is_unhealthy(server_env):
    done = probe({**server_env, "PORT": str(free_port())})
    assert done.returncode == 1
    assert "ConnectionError" in done.stderr
