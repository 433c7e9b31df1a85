"""Prometheus metrics for GET /metrics (text format 0.0.4), one `Metrics` per app.

- `http_requests_total{method,route,status}`: requests answered. `route` is the Flask URL rule
  (`/predict`), never the raw path, so cardinality stays bounded (`unmatched`: no route).
- `http_request_duration_seconds{route}`: histogram of the time to answer.
- `predictions_total{outcome="ok"|"failed"}`: tasks predicted.
- `prediction_failures_total{reason}`: failed tasks by FAILURE_REASONS class.
- `faces_detected_total`: faces found in successfully predicted tasks.
- `queue_depth`: jobs waiting in the job queue (backend/jobs.py), asked of a provider function
  at scrape time (the server passes its queue's; `no_queue`, always 0, for a bare Metrics).
  Training runs themselves are reported by GET /versions (`training`), since they run in job
  workers whose counters /metrics could not see.

Processes. By default each app has its own CollectorRegistry, so tests (and two apps in one
process) never share counts; with gunicorn WORKERS > 1 each worker then reports only its own
requests. For one view of all workers set PROMETHEUS_MULTIPROC_DIR to an empty, writable
directory before the server starts: prometheus_client reads that variable itself when it is
imported, writes every worker's values to files there, and /metrics sums them
(`python -m backend.server` empties the directory at start-up and tells prometheus_client when a
worker exits). In that mode values are per process, not per app. `queue_depth` is always
asked of the answering worker's provider, never summed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend import image_source

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # text/plain; version=0.0.4; charset=utf-8

# Why a task got no prediction. image_source's reasons plus the model's own.
NO_IMAGE_FIELD = "no_image_field"  # the task is not an object, or lacks the image field
IMAGE_UNREADABLE = "image_unreadable"  # not a supported image, or damaged
INTERNAL = "internal"  # a bug: the traceback is in the log
FAILURE_REASONS = (
    NO_IMAGE_FIELD,
    *image_source.REASONS,
    IMAGE_UNREADABLE,
    INTERNAL,
)
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: /health answers in milliseconds, a "Retrieve Predictions" batch can take a minute.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def no_queue() -> int:
    """A queue-depth provider for metrics without a queue: nothing is ever waiting."""
    return 0


class _QueueDepth(Collector):
    """queue_depth, read from the provider at each scrape (a callback, not a stored value)."""

    def __init__(self, provider: Callable[[], int]) -> None:
        self._provider = provider

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "queue_depth", "Jobs waiting in the backend's job queue.", value=self._provider()
        )


class Metrics:
    """The backend's metrics and their text exposition (see the module docstring)."""

    def __init__(
        self,
        *,
        multiproc_dir: Path | None = None,
        queue_depth: Callable[[], int] = no_queue,
    ) -> None:
        self.multiprocess = multiproc_dir is not None
        if multiproc_dir is not None:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise ValueError(
                    "PROMETHEUS_MULTIPROC_DIR must be set in the environment before the process "
                    "starts (prometheus_client reads it when first imported)"
                )
            if not Path(multiproc_dir).is_dir():
                raise ValueError(
                    f"PROMETHEUS_MULTIPROC_DIR={multiproc_dir} is not a directory; create it "
                    "(empty, writable by the server) or unset the variable"
                )
            # Values go to the per-process files; the exposition registry reads them all.
            owner = None
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=str(multiproc_dir))
        else:
            self.registry = owner = CollectorRegistry()
        self.registry.register(_QueueDepth(queue_depth))

        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by method, URL rule and status.",
            ("method", "route", "status"),
            registry=owner,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by URL rule.",
            ("route",),
            buckets=_DURATION_BUCKETS,
            registry=owner,
        )
        self.predictions = Counter(
            "predictions",
            "Tasks predicted, by outcome (ok or failed).",
            ("outcome",),
            registry=owner,
        )
        self.failures = Counter(
            "prediction_failures",
            "Tasks that got an empty prediction, by reason class.",
            ("reason",),
            registry=owner,
        )
        self.faces = Counter(
            "faces_detected", "Faces found in successfully predicted tasks.", registry=owner
        )
        # Every outcome and reason shows from the start, at 0: rates need a baseline sample.
        for outcome in ("ok", "failed"):
            self.predictions.labels(outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    # -- recording

    def observe_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """One answered request; `route` is the matched URL rule (None: no route matched)."""
        route = route or UNMATCHED_ROUTE
        method = method if method in _METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def prediction_ok(self, faces: int) -> None:
        self.predictions.labels("ok").inc()
        self.faces.inc(faces)

    def prediction_failed(self, reason: str) -> None:
        """A failed task; an unknown reason counts as INTERNAL so the label set stays fixed."""
        self.predictions.labels("failed").inc()
        self.failures.labels(reason if reason in FAILURE_REASONS else INTERNAL).inc()

    # -- exposition

    def render(self) -> bytes:
        """The text exposition of every metric (CONTENT_TYPE)."""
        return generate_latest(self.registry)


def reset_multiproc_dir(path: Path) -> None:
    """Create PROMETHEUS_MULTIPROC_DIR or empty it of a previous run's files: stale files from
    dead workers would otherwise be summed in forever. Only the master may call this, before
    any worker starts."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def worker_exited(path: Path, pid: int) -> None:
    """gunicorn's child_exit hook: drop the live-gauge files of a dead worker."""
    multiprocess.mark_process_dead(pid, str(path))
