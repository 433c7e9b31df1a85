"""Tests for backend/evaluation.py and scripts/evaluate.py (synthetic data only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.evaluation import (
    RowResult,
    TruthRow,
    match_face,
    normalised_error,
    plot_ced,
    read_truth_csv,
    summarise,
)
from backend.keypoints import FaceKeypoints

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def truth(left=(100.0, 100.0), right=(200.0, 100.0), file="a.jpg") -> TruthRow:
    return TruthRow(file=file, left=np.array(left, float), right=np.array(right, float))


def face(image_left, image_right, box=(0, 0, 300, 300), confidence=0.9) -> FaceKeypoints:
    points = np.zeros((6, 2))
    # rows: left_pupil (subject's left = image right), right_pupil (image left), corners
    points[0] = image_right
    points[1] = image_left
    return FaceKeypoints(
        box=np.array(box, float),
        points=points,
        confidences=np.full(6, confidence),
        confidence=confidence,
        method="test",
    )


def result(error: float | None, confidence: float = 0.5, seconds: float = 0.01, message=None):
    if error is None:
        return RowResult("x.jpg", False, math.inf, 0.0, seconds, message)
    return RowResult("x.jpg", True, error, confidence, seconds, None)


# --- read_truth_csv -------------------------------------------------------------------------


def test_read_truth_csv_reads_rows_and_ignores_extra_columns(tmp_path):
    path = tmp_path / "eyes.csv"
    path.write_text(
        "file,left_x,left_y,right_x,right_y,gender\na/1.jpg,10,20,30,40.5,1\nb/2.jpg,1.25,2,3,4,2\n"
    )
    rows = read_truth_csv(path)
    assert [r.file for r in rows] == ["a/1.jpg", "b/2.jpg"]
    np.testing.assert_array_equal(rows[0].left, [10, 20])
    np.testing.assert_array_equal(rows[0].right, [30, 40.5])
    np.testing.assert_array_equal(rows[1].left, [1.25, 2])


def test_read_truth_csv_column_order_does_not_matter(tmp_path):
    path = tmp_path / "eyes.csv"
    path.write_text("right_y,right_x,left_y,left_x,file\n4,3,2,1,z.png\n")
    (row,) = read_truth_csv(path)
    np.testing.assert_array_equal(row.left, [1, 2])
    np.testing.assert_array_equal(row.right, [3, 4])


def test_read_truth_csv_missing_column(tmp_path):
    path = tmp_path / "eyes.csv"
    path.write_text("file,left_x,left_y,right_x\na.jpg,1,2,3\n")
    with pytest.raises(ValueError, match=r"eyes.csv:1: missing column.*right_y"):
        read_truth_csv(path)


def test_read_truth_csv_non_numeric_value_names_the_line(tmp_path):
    path = tmp_path / "eyes.csv"
    path.write_text("file,left_x,left_y,right_x,right_y\na.jpg,1,2,3,4\nb.jpg,1,two,3,4\n")
    with pytest.raises(ValueError, match=r"eyes.csv:3: column 'left_y' is not a number: 'two'"):
        read_truth_csv(path)


def test_read_truth_csv_short_row_names_the_line(tmp_path):
    path = tmp_path / "eyes.csv"
    path.write_text("file,left_x,left_y,right_x,right_y\na.jpg,1,2,3\n")
    with pytest.raises(ValueError, match=r"eyes.csv:2: missing value for column 'right_y'"):
        read_truth_csv(path)


# --- normalised_error -----------------------------------------------------------------------


def test_normalised_error_known_numbers():
    t = truth(left=(100, 100), right=(200, 100))  # interocular distance 100
    assert normalised_error(np.array([100, 100]), np.array([200, 100]), t) == 0.0
    # left off by (3, 4) -> 5 px; right off by 2 px; the worse eye counts: 5 / 100
    assert normalised_error(np.array([103, 104]), np.array([202, 100]), t) == pytest.approx(0.05)
    assert normalised_error(np.array([100, 90]), np.array([200, 100]), t) == pytest.approx(0.1)


def test_normalised_error_scales_with_interocular_distance():
    t = truth(left=(0, 0), right=(30, 40))  # distance 50
    assert normalised_error(np.array([5, 0]), np.array([30, 40]), t) == pytest.approx(0.1)


# --- match_face -----------------------------------------------------------------------------


def test_match_face_picks_the_face_with_the_smallest_error():
    t = truth()  # midpoint (150, 100)
    poor = face((110, 100), (200, 100), box=(50, 0, 250, 200))  # e = 0.1
    good = face((101, 100), (200, 100), box=(0, 0, 300, 300))  # e = 0.01
    elsewhere = face((100, 100), (200, 100), box=(400, 400, 500, 500))  # box misses midpoint
    assert match_face([poor, good, elsewhere], t) is good
    assert match_face([poor, elsewhere], t) is poor


def test_match_face_uses_image_sides():
    t = truth()
    swapped = face((200, 100), (100, 100))  # image-left pupil where the image-right eye is
    right_way = face((100, 100), (200, 100))
    assert match_face([swapped, right_way], t) is right_way


def test_match_face_miss():
    t = truth()
    assert match_face([], t) is None
    assert match_face([face((100, 100), (200, 100), box=(160, 0, 300, 300))], t) is None


# --- summarise ------------------------------------------------------------------------------


def test_summarise_fractions_count_misses_as_failures():
    results = [
        result(0.02, confidence=0.9, seconds=0.010),
        result(0.04, confidence=0.8, seconds=0.020),
        result(0.08, confidence=0.5, seconds=0.030),
        result(0.20, confidence=0.3, seconds=0.040),
        result(None, seconds=0.050),  # missed face
        result(None, seconds=0.001, message="ImageError: unreadable"),
    ]
    s = summarise(results, "coarse", "fused")
    assert s["method"] == "coarse" and s["variant"] == "fused"
    assert s["faces"] == 6
    assert s["found_rate"] == pytest.approx(4 / 6)
    assert s["e05"] == pytest.approx(2 / 6)
    assert s["e10"] == pytest.approx(3 / 6)
    assert s["e25"] == pytest.approx(4 / 6)
    assert s["mean_e"] == pytest.approx(0.085)
    assert s["median_e"] == pytest.approx(0.06)
    assert s["ms_per_image"] == pytest.approx(30.0)  # median of the five read images
    assert s["failed_to_read"] == 1
    # confidence falls exactly as error rises: perfect ranking
    assert s["confidence_spearman"] == pytest.approx(1.0)
    # failures (e > 0.05): 0.08 and 0.20; lowest 20% of 4 found -> ceil(0.8) = 1 face (0.20)
    assert s["worst_20pct_failure_share"] == pytest.approx(0.5)
    json.dumps(s, allow_nan=False)


def test_summarise_worst_20pct_with_ten_faces():
    errors = [0.01, 0.02, 0.03, 0.04, 0.06, 0.07, 0.01, 0.02, 0.30, 0.40]
    confidences = [0.9, 0.8, 0.85, 0.7, 0.6, 0.75, 0.95, 0.65, 0.1, 0.2]
    results = [result(e, c) for e, c in zip(errors, confidences, strict=True)]
    s = summarise(results, "coarse", "v")
    # 4 failures; the 2 least confident faces (0.1, 0.2) hold 2 of them
    assert s["worst_20pct_failure_share"] == pytest.approx(0.5)
    assert s["confidence_spearman"] > 0.5


def test_summarise_anti_correlated_confidence():
    results = [result(e, c) for e, c in [(0.01, 0.1), (0.02, 0.2), (0.03, 0.3), (0.04, 0.4)]]
    s = summarise(results, "coarse", "v")
    assert s["confidence_spearman"] == pytest.approx(-1.0)
    assert s["worst_20pct_failure_share"] is None  # no failures


def test_summarise_nothing_found_is_json_safe():
    results = [result(None), result(None, message="ImageError: bad")]
    s = summarise(results, "coarse", "v")
    assert s["found_rate"] == 0.0 and s["e10"] == 0.0 and s["failed_to_read"] == 1
    assert s["mean_e"] is None and s["median_e"] is None
    assert s["confidence_spearman"] is None and s["worst_20pct_failure_share"] is None
    json.dumps(s, allow_nan=False)


# --- plot_ced -------------------------------------------------------------------------------


def test_plot_ced_writes_png(tmp_path):
    path = tmp_path / "sub" / "ced.png"
    curves = {
        "a": np.array([0.01, 0.04, 0.12, math.inf]),
        "b": np.array([0.2, math.inf]),
        "empty": np.array([]),
    }
    plot_ced(curves, path, "test")
    assert path.read_bytes()[:8] == PNG_MAGIC


# --- scripts/evaluate.py --------------------------------------------------------------------


def test_evaluate_script_end_to_end(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)).save(root / "noise.png")
    Image.fromarray(np.full((80, 80, 3), 127, np.uint8)).save(root / "flat.jpg")
    (root / "broken.jpg").write_bytes(b"this is not an image")
    csv_path = tmp_path / "eyes.csv"
    csv_path.write_text(
        "file,left_x,left_y,right_x,right_y\n"
        "noise.png,40,40,80,40\n"
        "flat.jpg,30,30,50,30\n"
        "broken.jpg,10,10,20,10\n"
    )
    out_json = tmp_path / "out" / "summary.json"
    out_png = tmp_path / "out" / "ced.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            "--csv", str(csv_path),
            "--root", str(root),
            "--method", "coarse",
            "--variant", "all",
            "--json", str(out_json),
            "--plot", str(out_png),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from backend.coarse.detector import VARIANTS

    payload = json.loads(out_json.read_text())
    summaries = payload["results"]
    assert [s["variant"] for s in summaries] == list(VARIANTS)
    for s in summaries:
        assert s["method"] == "coarse"
        assert s["faces"] == 3
        assert s["found_rate"] == 0.0
        assert s["e05"] == s["e10"] == s["e25"] == 0.0
        assert s["failed_to_read"] == 1
        assert s["mean_e"] is None
        assert s["ms_per_image"] >= 0.0
        assert {"median_e", "confidence_spearman", "worst_20pct_failure_share"} <= s.keys()
        assert s["variant"] in proc.stdout
    assert "broken.jpg" in proc.stderr
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_split_csv_keeps_people_apart_and_loses_no_row(tmp_path):
    names = [f"lfw/Person_{chr(65 + p)}_{k:04d}.jpg" for p in range(12) for k in range(1, 4)]
    names += [f"web/img_{i}.jpg" for i in range(30)]
    lines = ["file,left_x,left_y,right_x,right_y,pose"]
    lines += [f"{n},10,10,30,10,{i % 5}" for i, n in enumerate(names)]
    source = tmp_path / "eyes.csv"
    source.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "split_csv.py"), "--csv", str(source),
         "--out-dir", str(tmp_path / "split"), "--test-fraction", "0.3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    train = (tmp_path / "split" / "train.csv").read_text().splitlines()
    test = (tmp_path / "split" / "test.csv").read_text().splitlines()
    assert train[0] == test[0] == lines[0]
    assert sorted(train[1:] + test[1:]) == sorted(lines[1:])
    people = [{line.split(",")[0].rsplit("_", 1)[0] for line in part[1:] if "lfw" in line}
              for part in (train, test)]  # fmt: skip
    assert people[0] and people[1] and not people[0] & people[1]
    summary = json.loads(proc.stdout)
    assert summary["train_rows"] + summary["test_rows"] == len(names)

    bad = tmp_path / "bad.csv"
    bad.write_text("file,left_x\nx.jpg,1\n")
    refused = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "split_csv.py"), "--csv", str(bad),
         "--out-dir", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "missing column" in refused.stderr
    assert not (tmp_path / "nothing").exists()
