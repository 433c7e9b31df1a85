"""Where a Label Studio project's own models live, and the lock that lets one run train it.

    MODEL_DIR/projects/<id>/            a ModelStore: the project's versions, serving.json
    MODEL_DIR/projects/<id>/train.lock  held (flock) by the run training the project

The lock is an OS file lock, so it is shared by every process on the machine (gunicorn's job
thread, RQ workers, containers sharing the volume) and vanishes with its holder: a worker killed
mid-training (SIGKILL) leaves no stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = "train.lock"


def project_dir(model_dir: Path, project: int) -> Path:
    """The project's model directory (not created)."""
    return Path(model_dir) / "projects" / str(int(project))


def project_of(value: object) -> int | None:
    """The project id in what Label Studio sends: 3, "3", or "3.1746612998" (id.created)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isascii() and head.isdigit():
            return int(head)
    return None


def serving_roots(model_dir: Path, project: int | None) -> list[Path]:
    """The model stores a project's predictions come from, first promoted wins: the project's
    own (trained from its annotations), then MODEL_DIR's (scripts/train.py)."""
    roots = [Path(model_dir)]
    if project is not None:
        roots.insert(0, project_dir(model_dir, project))
    return roots


@contextmanager
def training_lock(model_dir: Path, project: int, timeout_s: float) -> Iterator[None]:
    """Hold the project's training lock; TimeoutError if another run keeps it past timeout_s."""
    directory = project_dir(model_dir, project)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"project {project} is still being trained by another run after "
                        f"{timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def training_running(model_dir: Path, project: int) -> bool:
    """Whether some process holds the project's training lock now."""
    path = project_dir(model_dir, project) / LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
