"""A real Redis server for tests: `redis-server` from the system, on a free loopback port.

The tests that stop Redis (to show that events are kept and training resumes) need a server of
their own, so one is always started here rather than borrowing the machine's. `make test`
installs `redis-server` (scripts/system_test_deps.sh); without it the tests fail and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from server_process import free_port

INSTALL_HINT = "install it with: apt-get install -y redis-server (make test does this as root)"


class RedisServer:
    """One redis-server process (no persistence) that a test can stop and start again on the
    same port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(f"redis-server is not on PATH; {INSTALL_HINT}")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
