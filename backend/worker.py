"""`python -m backend.worker`: an RQ worker for this backend's jobs (needs REDIS_URL).

It reads the same environment as the server (MODEL_DIR, LABEL_STUDIO_URL, TRAIN_*, ...) and
runs training and prediction jobs from the `pupil-backend` queue, each in a forked work horse,
so a crash or a SIGKILL of one job never takes a half-written model into the next. Start more
of them to predict a big project faster: its predict job is split into chunk jobs that every
worker takes from.

- The coarse detector is built before the first job (about 3 s), so that each work horse
  inherits it rather than building its own for every chunk.
- The worker runs RQ's scheduler too, which re-queues failed chunk jobs after their retry
  interval (backend/jobs.py RETRY_INTERVALS_S). One worker's scheduler holds the queue's lock;
  the scheduler process dies when Redis goes away, and a worker's maintenance starts one
  again: every MAINTENANCE_S rather than RQ's 10 minutes, and an idle worker wakes for it
  every WORKER_TTL_S - 15 s rather than 405 s, so retries wait a minute or two at most after
  an outage or a dead worker. The plain `rq worker --with-scheduler --url
  $REDIS_URL pupil-backend` works too (same jobs; without --with-scheduler nothing is retried).

A promoted version is picked up by every job as it starts (backend/serving.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from backend.jobs import QUEUE_NAME, worker_settings
from backend.model import warm_up
from backend.server import configure_logging

log = logging.getLogger("backend.worker")

MAINTENANCE_S = 60  # registry clean-up, and a scheduler started again where none runs
WORKER_TTL_S = 90  # a dead worker's key expires after this; an idle one wakes 15 s sooner


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
    warm_up(settings.coarse_variant)
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class _Worker(Worker):
        """RQ's worker, remembering whether a stop was asked for (SIGTERM or SIGINT)."""

        stop_asked = False

        def request_stop(self, signum, frame):
            self.stop_asked = True
            super().request_stop(signum, frame)

    while True:
        worker = _Worker([Queue(QUEUE_NAME, connection=connection)], connection=connection,
                         maintenance_interval=MAINTENANCE_S, worker_ttl=WORKER_TTL_S)  # fmt: skip
        log.info("worker %s listening on queue %s (model dir %s)", worker.name, QUEUE_NAME,
                 settings.model_dir)  # fmt: skip
        try:
            worker.work(logging_level=settings.log_level, with_scheduler=True)
        except (RedisConnectionError, RedisTimeoutError) as e:
            log.warning("worker %s could not reach Redis on its way out: %s", worker.name, e)
        if worker.stop_asked:
            return
        # RQ ends work() on a Redis error it meets between jobs, or in the heartbeat it sends
        # while a job runs (Redis restarting); the job's work horse goes on. Let it finish, then
        # start a new worker once Redis answers, rather than leave the queue without one.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stop asked for meanwhile: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _wait_for_horse(worker)
        log.warning("worker %s stopped on a Redis error; a new one starts once Redis answers",
                    worker.name)  # fmt: skip
        _wait_for_redis(connection)


def _wait_for_horse(worker) -> None:
    """Wait for the work horse a stopped worker left running (its job goes on without Redis)."""
    pid = worker.horse_pid
    if pid:
        log.info("waiting for work horse %s to finish its job", pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


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
