"""`python -m backend.worker`: an RQ worker for this backend's jobs (needs REDIS_URL).

It reads the same environment as the server (MODEL_DIR, LABEL_STUDIO_URL, TRAIN_*, ...) and
runs training and re-prediction jobs from the `pupil-backend` queue, each in a forked work
horse, so a crash or a SIGKILL of one job never takes a half-written model into the next. The
plain `rq worker --url $REDIS_URL pupil-backend` works too (same jobs, same environment).
A promoted version is picked up by every job as it starts (backend/serving.py).
"""

from __future__ import annotations

import logging
import sys
import time

from backend.jobs import QUEUE_NAME, worker_settings
from backend.server import configure_logging

log = logging.getLogger("backend.worker")


def main() -> None:
    try:
        settings = worker_settings()
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not settings.redis_url:
        sys.exit(
            "error: REDIS_URL is not set; without it the server runs jobs itself (no worker "
            "needed). Set REDIS_URL=redis://host:6379/0 to run jobs here."
        )
    configure_logging(settings.log_level)
    from redis import Redis
    from rq import Queue, Worker

    connection = Redis.from_url(settings.redis_url)
    _wait_for_redis(connection)
    worker = Worker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    log.info("worker %s listening on queue %s (model dir %s)", worker.name, QUEUE_NAME,
             settings.model_dir)  # fmt: skip
    worker.work(logging_level=settings.log_level)


def _wait_for_redis(connection, max_wait_s: float = 30.0) -> None:
    """Block until Redis answers (a worker may start before it, e.g. under docker-compose);
    once running, RQ itself reconnects after an outage."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    wait = 0.5
    while True:
        try:
            connection.ping()
            return
        except (RedisConnectionError, RedisTimeoutError) as e:
            log.warning("Redis not answering (%s); retrying in %.0f s", e, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)


if __name__ == "__main__":
    main()
