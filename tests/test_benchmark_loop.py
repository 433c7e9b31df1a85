"""scripts/benchmark_loop.py without servers: scoring Label Studio predictions, the selection of
faces, argument checks and the plot."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from script_module import script_module

from backend.evaluation import TruthRow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark_loop.py"
W, H = 200, 100
# image-left eye (the subject's right pupil) at (60, 50), image-right eye at (140, 50)
TRUTH = TruthRow("Ann_Example_0001.jpg", np.array([60.0, 50.0]), np.array([140.0, 50.0]))


@pytest.fixture(scope="module")
def loop():
    with script_module("benchmark_loop") as module:
        yield module


def region(label: str, x_px: float, y_px: float, face: str | None = "t1-face0") -> dict:
    out = {
        "from_name": "keypoints", "to_name": "image", "type": "keypointlabels",
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": x_px / W * 100, "y": y_px / H * 100, "width": 0.5,
                  "keypointlabels": [label]},
    }  # fmt: skip
    if face is not None:
        out["id"] = f"{face}-{label}"
    return out


def face(dx: float = 0.0, face_id: str | None = "t1-face0") -> list[dict]:
    """Both pupils as the backend names them: the subject's left is on the image's right."""
    return [
        region("left_pupil", 140.0 + dx, 50.0, face_id),
        region("right_pupil", 60.0 + dx, 50.0, face_id),
        region("left_eye_outer", 150.0, 50.0, face_id),
    ]


def test_a_prediction_on_the_truth_scores_zero_and_an_offset_scales_by_interocular(loop):
    assert loop.prediction_error(face(), TRUTH) == pytest.approx(0.0, abs=1e-9)
    assert loop.prediction_error(face(dx=4.0), TRUTH) == pytest.approx(4.0 / 80.0)


def test_left_pupil_is_matched_to_the_image_right_eye(loop):
    swapped = [
        region("left_pupil", 60.0, 50.0),  # the subject's left put on the image's left: wrong
        region("right_pupil", 140.0, 50.0),
    ]
    assert loop.prediction_error(swapped, TRUTH) == pytest.approx(1.0)


def test_no_face_is_an_infinite_error_and_a_failure(loop):
    assert loop.prediction_error([], TRUTH) == math.inf
    only_one_pupil = [region("left_pupil", 140.0, 50.0)]
    assert loop.prediction_error(only_one_pupil, TRUTH) == math.inf
    score = loop.accuracy([0.01, 0.07, math.inf, 0.2])
    assert score == {"n": 4, "e05": 0.25, "e10": 0.5, "no_face": 1,
                     "median_e": pytest.approx(0.07)}  # fmt: skip


def test_several_faces_score_the_best_one_and_ids_or_order_group_them(loop):
    two = face(dx=30.0, face_id="t1-face0") + face(dx=2.0, face_id="t1-face1")
    assert loop.prediction_error(two, TRUTH) == pytest.approx(2.0 / 80.0)
    no_ids = face(dx=30.0, face_id=None) + face(dx=2.0, face_id=None)
    assert loop.prediction_error(no_ids, TRUTH) == pytest.approx(2.0 / 80.0)


def test_score_tasks_uses_the_served_version_and_counts_missing_predictions(loop):
    tasks = {
        1: {"predictions": [
            {"id": 10, "model_version": "coarse", "result": face(dx=20.0)},
            {"id": 11, "model_version": "p1-v2", "result": face(dx=1.0)},
        ]},
        2: {"predictions": [{"id": 12, "model_version": "coarse", "result": face()}]},
        3: {"predictions": [{"id": 13, "model_version": "p1-v2", "result": []}]},
    }  # fmt: skip
    truth = {1: TRUTH, 2: TRUTH, 3: TRUTH}
    served = loop.score_tasks(tasks, truth, [1, 2, 3], "p1-v2")
    assert served["n"] == 3 and served["e05"] == pytest.approx(1 / 3)
    assert served["no_face"] == 2  # task 2 has no p1-v2 prediction, task 3 an empty one
    coarse = loop.score_tasks(tasks, truth, [1, 2], "coarse")
    assert coarse["e05"] == 0.5 and coarse["e10"] == 0.5


def test_annotations_put_the_truth_in_percent_with_the_subject_names(loop):
    results = loop.keypoint_results(TRUTH, W, H)
    by_label = {r["value"]["keypointlabels"][0]: r["value"] for r in results}
    assert by_label["left_pupil"]["x"] == pytest.approx(70.0)  # 140 px of 200
    assert by_label["right_pupil"]["x"] == pytest.approx(30.0)
    assert by_label["left_pupil"]["y"] == pytest.approx(50.0)
    assert loop.prediction_error(results, TRUTH) == pytest.approx(0.0, abs=1e-9)


def test_selected_faces_are_one_per_person_from_the_test_split(loop):
    rows = [
        TruthRow(f"lfw/P{i}_Q_{j:04d}.jpg", np.array([1.0, 1.0]), np.array([5.0, 1.0]))
        for i in range(200)
        for j in range(1, 3)
    ]
    picked = loop.select_faces(rows, 10, seed=0)
    people = [loop.person_of(r.file) for r in picked]
    assert len(picked) == 10 and len(set(people)) == 10
    with pytest.raises(ValueError, match="people"):
        loop.select_faces(rows, 10_000, seed=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "100", "--rounds", "2", "--per-round", "50"], "no held-out task"),
        (["--rounds", "0"], "--rounds must be"),
        (["--per-round", "1"], "--per-round must be"),
        (["--epochs", "0"], "--epochs must be"),
        (["--csv", "/nonexistent/eyes.csv"], "no such file"),
        (["--work-dir", "{tmp}"], "not a benchmark work dir"),
    ],
)
def test_arguments_are_checked_before_any_server_starts(tmp_path, args, message):
    csv = tmp_path / "eyes.csv"
    csv.write_text("file,left_x,left_y,right_x,right_y\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--csv", str(csv), "--root", str(tmp_path),
         "--work-dir", str(tmp_path / "work"), *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "work").exists()


def test_the_plot_is_written(loop, tmp_path):
    rounds = [
        {"round": 0, "labels": 0, "outcome": "coarse", "e05": 0.6, "e10": 0.9, "n": 300,
         "seconds_to_predictions": 22.0, "train_seconds": None},
        {"round": 1, "labels": 50, "outcome": "promoted", "e05": 0.7, "e10": 0.95, "n": 250,
         "seconds_to_predictions": 80.0, "train_seconds": 40.0},
        {"round": 2, "labels": 100, "outcome": "rejected", "e05": 0.7, "e10": 0.95, "n": 200,
         "seconds_to_predictions": None, "train_seconds": 45.0},
    ]  # fmt: skip
    path = tmp_path / "loop.png"
    loop.plot_rounds(rounds, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rounds:  # with the scores on the tasks never labelled
        r.update(fixed_e05=r["e05"] - 0.05, fixed_e10=r["e10"], fixed_n=100)
    loop.plot_rounds(rounds, tmp_path / "fixed.png", "test")
    assert (tmp_path / "fixed.png").stat().st_size > 0
