"""scripts/benchmark_preannotate.py: its arguments and report, and a tiny run end to end.

The tiny run is the real thing on 20 synthetic faces: Label Studio (from .venv-ls), a
redis-server, the backend and 1 then 2 `python -m backend.worker` processes; each worker count
pre-annotates a fresh project through POST /jobs/predict (2 chunks of 10), every task ends with
exactly one prediction, and the JSON report has images/s per count and the scaling.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from script_module import script_module

from backend.evaluation import TruthRow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark_preannotate.py"


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmark_preannotate") as module:
        yield module


def test_worker_counts_increase_from_one(bench):
    assert bench.parse_workers("1,2") == [1, 2] and bench.parse_workers("2, 4") == [2, 4]
    for bad in ("", "0,1", "2,1", "1,1", "one"):
        with pytest.raises(argparse.ArgumentTypeError, match="--workers must"):
            bench.parse_workers(bad)


def test_the_scaling_is_the_last_runs_images_per_second_over_the_first(bench):
    runs = [{"workers": 1, "images_per_s": 10.0}, {"workers": 2, "images_per_s": 17.5}]
    assert bench.summarise(runs) == {"images_per_s": {"1": 10.0, "2": 17.5}, "scaling": 1.75,
                                     "scaling_between": [1, 2]}  # fmt: skip


def test_faces_are_picked_in_a_seeded_order_and_never_more_than_there_are(bench):
    rows = [TruthRow(f"f{i}.jpg", np.zeros(2), np.ones(2)) for i in range(10)]
    picked = bench.pick_faces(rows, 4, seed=3)
    assert len({r.file for r in picked}) == 4 and picked == bench.pick_faces(rows, 4, seed=3)
    with pytest.raises(ValueError, match="the CSV has 10 faces; --images 11"):
        bench.pick_faces(rows, 11, seed=0)


def test_bad_arguments_are_refused_before_anything_starts(bench, tmp_path):
    def problem(*argv: str) -> str | None:
        parser = argparse.ArgumentParser()
        parser.add_argument("--images", type=int, default=2000)
        parser.add_argument("--csv", type=Path)
        parser.add_argument("--root", type=Path)
        parser.add_argument("--work-dir", type=Path, default=tmp_path / "work")
        return bench.check_args(parser.parse_args(argv))

    assert problem() is None
    assert problem("--images", "0") == "--images must be at least 1"
    assert problem("--csv", str(tmp_path / "eyes.csv")).startswith("--csv and --root go together")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert "is not empty and not a benchmark work dir" in problem(
        "--work-dir", str(tmp_path / "mine")
    )


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "20", "--workers", "1,2",
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["workers"] for r in report["runs"]] == [1, 2]
    for r in report["runs"]:
        assert r["chunks"] == 2 and r["created"] == 20
        assert r["images_per_s"] == pytest.approx(20 / r["seconds"], rel=0.01)
    first, second = report["runs"]
    assert first["project"] != second["project"]
    assert report["scaling"] == pytest.approx(second["images_per_s"] / first["images_per_s"],
                                              abs=0.01)  # fmt: skip
    assert f"scaling 1 -> 2 workers: x{report['scaling']:.2f}" in done.stdout
    first_worker = (tmp_path / "work" / "worker-1.log").read_text()
    assert "job=predict-p" in first_worker and "-c001 outcome=done" in first_worker
