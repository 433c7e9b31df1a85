"""scripts/benchmark_load.py: its pieces on their own, then the whole script, tiny, end to end
against the real server with a real training job running (and stopped, also when interrupted)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from script_module import script_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark_load.py"


@pytest.fixture(scope="module")
def load():
    with script_module("benchmark_load") as module:
        yield module


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------------------------
# Pieces


def test_photos_have_the_sizes_and_faces_asked_for_and_are_reused(load, tmp_path):
    sources = load.face_sources(None, None, 0, seed=0)
    photos = load.build_photos(tmp_path, 4, sources, "astronaut", seed=3)
    assert [len(p.faces) for p in photos] == [1, 2, 3, 1]
    for index, photo in enumerate(photos):
        with Image.open(tmp_path / photo.name) as im:
            assert im.format == "JPEG"
            assert im.size == (photo.width, photo.height)
        assert sorted(im.size) == sorted(load.SIZES[index])
        for left, right in photo.faces:  # pupils inside the photo, left of right, level
            assert 0 < left[0] < right[0] < photo.width and 0 < left[1] < photo.height
            assert abs(left[1] - right[1]) < 0.2 * (right[0] - left[0])
    stamps = {p.name: (tmp_path / p.name).stat().st_mtime_ns for p in photos}
    again = load.build_photos(tmp_path, 4, sources, "astronaut", seed=3)
    assert again == photos
    assert {p.name: (tmp_path / p.name).stat().st_mtime_ns for p in again} == stamps
    other = load.build_photos(tmp_path, 4, sources, "astronaut", seed=4)  # new inputs: rebuilt
    assert other != photos


def test_the_pasted_faces_are_found_by_the_detector(load, tmp_path, coarse_detector):
    from backend.images import load_image

    photos = load.build_photos(tmp_path, 3, load.face_sources(None, None, 0, 0), "a", seed=0)
    for photo in photos:
        found = coarse_detector.detect(load_image(tmp_path / photo.name).grey)
        assert len(found) == len(photo.faces), photo.name
        truth = np.array(photo.faces)  # (faces, 2 eyes, xy), image-left eye first
        for face in found:
            pupils = np.array([face.point("right_pupil"), face.point("left_pupil")])
            iod = np.linalg.norm(pupils[1] - pupils[0])
            errors = np.linalg.norm(truth - pupils, axis=2).max(axis=1) / iod
            assert errors.min() < 0.25, (photo.name, errors)


def test_slope_percentiles_and_the_soak_fit_skip_the_warm_up(load):
    t = np.arange(0, 120, 2.0)
    assert load.slope_per_min(t, 500 + 3.0 * t / 60) == pytest.approx(3.0)
    assert load.slope_per_min([0, 1], [1, 2]) is None
    noisy = 500 + 3.0 * t / 60 + np.where(np.arange(len(t)) % 2, 10.0, -10.0)
    slope, stderr = load.slope_fit(t, noisy)
    assert slope == pytest.approx(3.0, abs=3 * stderr) and 0 < stderr < 5
    p = load.percentiles(list(range(1, 101)))
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.0, abs=0.05)
    # 60 s of soak: +200 MB in the first half (warm-up), then flat
    memory = [
        {"t_s": 100 + s, "rss_mb": 400 + min(s, 30) * 200 / 30, "pss_mb": 300.0}
        for s in range(0, 61, 2)
    ]
    fit = load.soak_memory(memory, 100, 160)
    assert fit["rss"]["slope_mb_per_min"] == pytest.approx(0.0, abs=1e-6)
    assert fit["rss"]["slope_stderr_mb_per_min"] == pytest.approx(0.0, abs=1e-6)
    assert fit["rss"]["start_mb"] == 400 and fit["rss"]["max_mb"] == 600
    assert fit["fit_from_s"] == 130


def test_an_answer_is_ok_only_as_a_list_of_one_prediction(load):
    def answer(status: int, body: object) -> requests.Response:
        r = requests.Response()
        r.status_code = status
        r._content = json.dumps(body).encode()
        return r

    region = {"value": {"x": 1, "y": 2, "keypointlabels": ["left_pupil"]}}
    one = {"result": [region, region], "score": 0.5, "model_version": "coarse-fused-0.1.0"}
    assert load.check_answer(answer(200, {"results": [one]})) == (True, 2, None)
    assert load.check_answer(answer(200, {"results": [one, one]}))[0] is False
    assert load.check_answer(answer(200, {"results": [{"result": None}]}))[0] is False
    assert load.check_answer(answer(200, [one]))[0] is False
    ok, _, error = load.check_answer(answer(503, {"error": "busy"}))
    assert not ok and error.startswith("HTTP 503")


def test_failed_tasks_come_from_the_metrics_delta(load):
    before = load.parse_metrics(
        'predictions_total{outcome="ok"} 3.0\npredictions_total{outcome="failed"} 1.0\n'
        'prediction_failures_total{reason="not_found"} 1.0\n# HELP x y\n'
    )
    after = load.parse_metrics(
        'predictions_total{outcome="ok"} 10.0\npredictions_total{outcome="failed"} 3.0\n'
        'prediction_failures_total{reason="not_found"} 2.0\n'
        'prediction_failures_total{reason="internal"} 1.0\n'
    )
    delta = load.metric_delta(before, after)
    assert delta["predictions_ok"] == 7 and delta["tasks_failed"] == 2
    assert delta["failure_reasons"] == {"not_found": 1.0, "internal": 1.0}


def test_targets_are_evaluated_against_the_issue(load):
    def level(clients, p50, p95, errors=0, cpu_ms=100.0):
        return {"clients": clients, "latency_ms": {"p50": p50, "p95": p95},
                "errors": {"total": errors}, "server_cpu_ms_per_request": cpu_ms}  # fmt: skip

    soak = {"errors": {"total": 0}, "wall_s": 600,
            "rss": {"slope_mb_per_min": 0.5, "slope_stderr_mb_per_min": 0.1},
            "pss": {"slope_mb_per_min": 0.2}}  # fmt: skip
    good = load.targets([level(1, 100, 120), level(8, 300, 390)], soak, 2.0, cpus=8)
    assert good["zero_errors"]["met"] and good["memory_flat"]["met"]
    assert good["p95_at_8_over_p50_at_1"]["ratio"] == 3.9
    assert good["p95_at_8_over_p50_at_1"]["met"] is True
    assert good["p95_at_8_over_p50_at_1"]["mean_ratio_floor"] == 1.0  # 8 * 100 / (8 * 100)
    soak["rss"]["slope_mb_per_min"] = 2.5
    bad = load.targets([level(1, 100, 120), level(8, 300, 410, errors=1)], soak, 2.0, cpus=2)
    assert not bad["zero_errors"]["met"] and bad["zero_errors"]["errors"] == 1
    assert bad["p95_at_8_over_p50_at_1"]["met"] is False
    assert bad["p95_at_8_over_p50_at_1"]["mean_ratio_floor"] == 4.0
    assert bad["memory_flat"]["met"] is False


def test_other_load_says_whether_the_machine_was_quiet(load):
    def stretch(other):
        return {"cpu_cores": {"other": other}}

    assert load.other_load([stretch(0.1), stretch(0.2)], None)["quiet"] is True
    busy = load.other_load([stretch(0.1)], stretch(1.3))
    assert busy["quiet"] is False and busy["max_cores"] == 1.3


@pytest.mark.parametrize(
    "args",
    [["--levels", "0"], ["--levels", "a,b"], ["--csv", "x.csv"], ["--env", "1X=2"],
     ["--requests-per-level", "5", "--seconds-per-level", "5"]],
)  # fmt: skip
def test_bad_arguments_exit_2(args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, timeout=60)
    assert done.returncode == 2, done.stderr


# ---------------------------------------------------------------------------------------------
# The whole script against the real server and a real training job

TINY = [
    "--photos", "3", "--levels", "1,2", "--requests-per-level", "4", "--warmup", "2",
    "--sample-s", "1", "--train-epochs", "40", "--start-timeout", "120",
    "--train-start-timeout", "240", "--max-s", "400",
]  # fmt: skip


@pytest.mark.slow
def test_a_tiny_run_reports_levels_soak_training_and_targets_and_stops_everything(tmp_path):
    out = tmp_path / "load.json"
    plot = tmp_path / "load.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--soak-s", "6", "--soak-clients", "2",
         "--json", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=480, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["server"]["workers"] == 1 and report["server"]["threads"] == 4  # documented
    assert report["server"]["model_version"].startswith("coarse-")
    assert [lv["clients"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["requests"] == 4 and level["ok"] == 4
        assert level["errors"] == {"http": 0, "transport": 0, "bad_answer": 0,
                                   "failed_tasks": 0, "total": 0}  # fmt: skip
        lat = level["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert level["throughput_rps"] > 0 and level["faces_per_s"] > 0
        # every pasted face read through /data/local-files and found
        assert level["faces_found"] >= level["faces_pasted"] >= 4
        assert level["server_ms_mean"] > 0 and level["cpu_cores"]["server"] > 0
    assert all(lv["cpu_cores"]["other"] >= 0 for lv in report["levels"])
    assert report["other_load"]["max_cores"] == max(
        s["cpu_cores"]["other"] for s in [*report["levels"], report["soak"]]
    )
    assert report["targets"]["zero_errors"] == {"errors": 0, "met": True}
    ratio = report["targets"]["p95_at_8_over_p50_at_1"]
    assert ratio["ratio"] is None and ratio["met"] is None  # no level of 8 clients here

    soak = report["soak"]
    assert soak["clients"] == 2 and 5 <= soak["wall_s"] < 6 + 130
    assert soak["errors"]["total"] == 0 and soak["requests"] >= 2
    assert soak["rss"]["start_mb"] > 50 and soak["rss"]["max_mb"] >= soak["rss"]["end_mb"]
    assert soak["samples"] >= 3 and soak["rss"]["slope_mb_per_min"] is not None
    memory = report["memory_samples"]
    assert {"level-1", "level-2", "soak"} <= {m["phase"] for m in memory}
    assert all(m["server_processes"] >= 2 for m in memory)  # gunicorn master + worker
    flat = report["targets"]["memory_flat"]
    assert flat["rss_slope_mb_per_min"] == soak["rss"]["slope_mb_per_min"]
    assert flat["met"] == (flat["rss_slope_mb_per_min"] <= flat["limit_mb_per_min"])

    training = report["training"]
    assert "scripts/train.py" in training["command"] and training["runs_started"] >= 1
    assert training["epochs_seen"] >= 1 and training["cpu_s"] > 0
    assert sum(lv["trainer_epochs"] for lv in report["levels"]) + soak["trainer_epochs"] >= 0
    assert all(gone(pid) for pid in [report["server"]["pid"], *training["pids"]])
    assert not Path(report["photos"]["dir"]).exists()  # the temporary work dir is removed
    with Image.open(plot) as im:
        assert im.size[0] > 1000
    assert "p95(8) / p50(1)" in done.stdout and "zero errors: True" in done.stdout


@pytest.mark.slow
def test_sigterm_midway_stops_the_server_and_the_training_job(tmp_path):
    out = tmp_path / "load.json"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--soak-s", "300", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while "[load] soak 4 clients: start" not in seen:  # say() lines arrive on stderr
            assert time.monotonic() < deadline and process.poll() is None, seen[-3000:]
            seen += process.stderr.readline()
        time.sleep(2)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
        assert process.returncode == 130
        assert time.monotonic() - started < 90
    finally:
        if process.poll() is None:  # SIGTERM: the script stops its server and training job
            process.terminate()
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and report["phase_reached"] == "soak"
    assert [lv["clients"] for lv in report["levels"]] == [1, 2]
    assert report["soak"] is None and report["training"]["runs_started"] >= 1
    assert all(gone(pid) for pid in [report["server"]["pid"], *report["training"]["pids"]])
    assert not Path(report["photos"]["dir"]).exists()
    assert math.isfinite(report["wall_s"])


@pytest.mark.slow
def test_the_server_dies_with_the_script_even_on_sigkill(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--no-train", "--json", str(tmp_path / "x.json"),
         "--work-dir", str(tmp_path / "work")],  # killed: it cannot remove a temporary one
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    server = None
    try:
        deadline = time.monotonic() + 200
        while server is None:
            assert time.monotonic() < deadline and process.poll() is None
            line = process.stderr.readline()
            if "[load] server ready at" in line:
                server = int(line.split("pid=")[1].split()[0])
        assert not gone(server)
        process.kill()  # no finally block runs: the parent-death signal stops the server
        process.communicate(timeout=30)
        deadline = time.monotonic() + 60
        while not gone(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gone(server)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        if server is not None and not gone(server):  # never leave it behind, even on failure
            os.killpg(server, signal.SIGKILL)
