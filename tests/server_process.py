"""Run the real `python -m backend.server` in a subprocess for a test, and always stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    env: Mapping[str, str], log_path: Path, ready_path: str = "/health", timeout_s: float = 60
) -> Iterator[subprocess.Popen]:
    """Start the server with `env` (which must set PORT and HOST=127.0.0.1); yield it once it
    answers `ready_path` (any status); terminate it (then kill) on the way out.

    The server's output goes to `log_path`; a server that never answers fails with its log.
    """
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend.server"],
            cwd=ROOT,
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{env['PORT']}{ready_path}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{log_path.read_text()}")
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
