"""The benchmark scripts run end to end on a tiny labelled set built from the committed face."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = REPO / "tests" / "data" / "astronaut.png"
# image-left eye (the subject's right pupil), image-right eye; measured on the committed image
TRUTH = ((203.3, 101.1), (246.7, 103.5))


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory) -> tuple[Path, Path]:
    """Four 'people': the astronaut at two scales and mirrored, plus one faceless image."""
    root = tmp_path_factory.mktemp("labelled")
    rgb = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    rows = ["file,left_x,left_y,right_x,right_y"]
    (lx, ly), (rx, ry) = TRUTH
    shutil.copy(ASTRONAUT, root / "Ann_Astro_0001.png")
    rows.append(f"Ann_Astro_0001.png,{lx},{ly},{rx},{ry}")
    small = cv2.resize(rgb, (384, 384), interpolation=cv2.INTER_AREA)
    Image.fromarray(small).save(root / "Bea_Astro_0001.jpg", quality=95)
    k = 384 / 512
    rows.append(
        f"Bea_Astro_0001.jpg,{(lx + 0.5) * k - 0.5},{(ly + 0.5) * k - 0.5},"
        f"{(rx + 0.5) * k - 0.5},{(ry + 0.5) * k - 0.5}"
    )
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(root / "Cid_Astro_0001.png")
    rows.append(f"Cid_Astro_0001.png,{511 - rx},{ry},{511 - lx},{ly}")
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(root / "Dan_Blank_0001.png")
    rows.append("Dan_Blank_0001.png,100,100,150,100")
    csv = root / "eyes.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv, root


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_benchmark_speed_reports_the_ratio_to_detection_alone(labelled_set, tmp_path):
    csv, root = labelled_set
    out = tmp_path / "speed.json"
    done = run_script(
        "benchmark_speed.py",
        "--csv",
        str(csv),
        "--root",
        str(root),
        "--n",
        "3",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["size"] == "640x480"
    ms = report["median_ms"]
    assert 0 < ms["detect_only"] and 0 < ms["pipeline"] <= ms["decode+pipeline"] * 1.5
    assert report["ratio_pipeline_to_detection"] == pytest.approx(
        ms["pipeline"] / ms["detect_only"]
    )


def test_calibrate_confidence_fits_and_reports(labelled_set):
    csv, root = labelled_set
    done = run_script(
        "calibrate_confidence.py", "--csv", str(csv), "--root", str(root), "--workers", "1"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    # three astronaut faces found (the blank image is a miss), split by person into two halves
    assert report["fit_eyes"] + 2 * report["check_faces"] == 6
    assert set(report["coefficients"]) >= {"intercept", "evidence", "asymmetry"}
    assert "COEFFICIENTS = np.array([" in done.stdout


def test_render_example_draws_the_keypoints(tmp_path):
    out = tmp_path / "example.png"
    done = run_script("render_example.py", str(ASTRONAUT), str(out))
    assert done.returncode == 0, done.stderr
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[1] == 600
    # the left pupil's marker colour (BGR green) is drawn somewhere
    assert np.any(np.all(picture == (0, 255, 0), axis=2))
