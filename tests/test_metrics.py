"""GET /metrics: Prometheus text format, bounded labels, per-app registries, and one summed view
of all gunicorn workers with PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, running_server

from backend.metrics import FAILURE_REASONS, Metrics
from backend.server import create_app, gunicorn_options
from backend.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CONFIG = (ROOT / "label_config" / "pupils.xml").read_text(encoding="utf-8")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.get_data(as_text=True)


@pytest.fixture
def client():
    return create_app(Settings(local_files_document_root=DATA)).test_client()


def test_metrics_are_prometheus_text_with_every_family(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    for name in (
        "http_requests_total",
        "http_request_duration_seconds",
        "predictions_total",
        "prediction_failures_total",
        "faces_detected_total",
        "queue_depth",
    ):
        assert f"# TYPE {name.removesuffix('_total')} " in text or f"# TYPE {name} " in text
    assert value(text, "queue_depth") == 0.0  # nothing queued
    for reason in FAILURE_REASONS:
        assert value(text, "prediction_failures_total", reason=reason) == 0.0
    assert value(text, "predictions_total", outcome="ok") == 0.0


def test_requests_are_counted_by_url_rule_not_raw_path(client):
    for _ in range(2):
        client.get("/health")
    for path in ("/a", "/b/c", "/health/x"):
        client.get(path)
    client.open("/health", method="PROPFIND")
    client.post("/predict", data=b"{oops", content_type="application/json")
    text = scrape(client)
    assert value(text, "http_requests_total", method="GET", route="/health", status="200") == 2
    assert value(text, "http_requests_total", method="GET", route="unmatched", status="404") == 3
    # A method a route does not allow fails routing too; odd methods share one label value.
    assert value(text, "http_requests_total", method="other", route="unmatched", status="405") == 1
    assert value(text, "http_requests_total", method="POST", route="/predict", status="400") == 1
    assert value(text, "http_request_duration_seconds_count", route="/health") == 2
    routes = {dict(labels).get("route") for name, labels in samples(text) if "http_" in name}
    assert routes == {"/health", "unmatched", "/predict"}


def test_predictions_failures_and_faces_are_counted(client):
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=astronaut.png"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=missing.png"}},
        {"id": 3, "data": {"image": "/data/local-files/?d=../x.png"}},
        {"id": 4, "data": {"other": "x"}},
        {"id": 5, "data": {"image": "/data/local-files/?d=astronaut.png"}},
    ]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    text = scrape(client)
    assert value(text, "predictions_total", outcome="ok") == 2
    assert value(text, "predictions_total", outcome="failed") == 3
    assert value(text, "prediction_failures_total", reason="not_found") == 1
    assert value(text, "prediction_failures_total", reason="forbidden_source") == 1
    assert value(text, "prediction_failures_total", reason="no_image_field") == 1
    assert value(text, "faces_detected_total") == 2


def test_an_unexpected_error_in_one_task_counts_as_internal(client, monkeypatch, caplog):
    from backend import model

    def explode(variant, grey):
        raise RuntimeError("detector bug")

    monkeypatch.setattr(model, "detect_faces", explode)
    task = {"id": 9, "data": {"image": "/data/local-files/?d=astronaut.png"}}
    with caplog.at_level(logging.WARNING, logger="backend"):
        response = client.post("/predict", json={"tasks": [task, task], "label_config": CONFIG})
    assert response.status_code == 200 and len(response.get_json()["results"]) == 2
    assert value(scrape(client), "prediction_failures_total", reason="internal") == 2
    assert "task=9 outcome=failed reason=internal" in caplog.text
    assert "detector bug" in caplog.text  # the traceback is in the log, not the answer


def test_each_app_has_its_own_registry_and_queue_depth_provider():
    first = create_app(Settings()).test_client()
    second = create_app(Settings(), queue_depth=lambda: 7).test_client()
    first.get("/health")
    first.get("/health")
    second.get("/health")
    health = {"method": "GET", "route": "/health", "status": "200"}
    assert value(scrape(first), "http_requests_total", **health) == 2
    assert value(scrape(second), "http_requests_total", **health) == 1
    assert value(scrape(second), "queue_depth") == 7


def test_unknown_reasons_are_counted_as_internal_to_keep_labels_fixed():
    metrics = Metrics()
    metrics.prediction_failed("something_new")
    text = metrics.render().decode()
    assert value(text, "prediction_failures_total", reason="internal") == 1
    assert value(text, "prediction_failures_total", reason="something_new") is None


def test_multiprocess_dir_needs_the_environment_variable_at_start(tmp_path):
    with pytest.raises(ValueError, match="must be set in the environment before"):
        create_app(Settings(prometheus_multiproc_dir=tmp_path))


def test_several_workers_without_a_multiprocess_dir_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="backend"):
        create_app(Settings(workers=2))
    assert "without PROMETHEUS_MULTIPROC_DIR" in caplog.text


# ---------------------------------------------------------------------------------------------
# Several gunicorn workers, one view


def test_gunicorn_workers_are_summed_with_prometheus_multiproc_dir(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    # A previous run's file, as a crashed server would leave it: start-up must discard it.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from prometheus_client import Counter; "
            "Counter('http_requests', '', ['method', 'route', 'status'])"
            ".labels('GET', '/health', '200').inc(1000)",
        ],
        env=env,
        check=True,
    )
    assert list(metrics_dir.glob("counter_*.db"))

    port = free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", WORKERS="2", THREADS="1", LOG_LEVEL="INFO")
    env.pop("LABEL_STUDIO_URL", None)
    env.pop("BASIC_AUTH_USER", None)
    env.pop("BASIC_AUTH_PASS", None)
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    sent = 0
    with running_server(env, log_path, ready_path="/versions"):
        # Bursts of concurrent requests on fresh connections until both workers have answered
        # some (which worker accepts a connection is up to the kernel).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(_get_health, [url] * 16))
            assert statuses == [200] * 16
            sent += 16
            if len(_health_pids(log_path.read_text())) >= 2:
                break
        text = requests.get(f"{url}/metrics", timeout=5).text
    log = log_path.read_text()
    health = {"method": "GET", "route": "/health", "status": "200"}
    assert value(text, "http_requests_total", **health) == sent, log
    assert value(text, "http_request_duration_seconds_count", route="/health") == sent
    assert len(_health_pids(log)) == 2, "both workers should have answered"


def _get_health(url: str) -> int:
    with requests.Session() as session:  # a new connection each time
        return session.get(f"{url}/health", timeout=5).status_code


def _health_pids(log: str) -> set[str]:
    return set(re.findall(r"pid=(\d+) method=GET path=/health status=200", log))


def test_gunicorn_reports_dead_workers_only_in_multiprocess_mode(tmp_path):
    assert "child_exit" not in gunicorn_options(Settings())
    hook = gunicorn_options(Settings(prometheus_multiproc_dir=tmp_path))["child_exit"]
    live_gauge = tmp_path / "gauge_livesum_4242.db"
    live_gauge.write_bytes(b"")
    hook(None, type("Worker", (), {"pid": 4242})())
    assert not live_gauge.exists()
