"""scripts/simulate_active_learning.py: labels needed, savings, and a whole tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from face_dataset import write_dataset
from script_module import script_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "simulate_active_learning.py"


@pytest.fixture(scope="module")
def sim():
    with script_module("simulate_active_learning") as module:
        yield module


def curve(*points: tuple[int, float, float]) -> list[dict]:
    return [{"labels": n, "e05": 0.0, "e10": e10, "mean_e": m} for n, e10, m in points]


def test_labels_to_reach_interpolates_between_rounds(sim):
    c = curve((0, 0.90, 0.08), (100, 0.94, 0.06), (200, 0.96, 0.05))
    assert sim.labels_to_reach(c, "e10", 0.95) == pytest.approx(150)
    assert sim.labels_to_reach(c, "mean_e", 0.07) == pytest.approx(50)
    assert sim.labels_to_reach(c, "e10", 0.90) == 0
    assert sim.labels_to_reach(c, "e10", 0.97) is None


def test_savings_against_random_at_the_full_budget(sim):
    curves = {
        "random": curve((0, 0.90, 0.08), (100, 0.92, 0.07), (200, 0.94, 0.06)),
        "uncertainty": curve((0, 0.90, 0.08), (100, 0.94, 0.06), (200, 0.96, 0.05)),
        "diverse": curve((0, 0.90, 0.08), (100, 0.91, 0.075), (200, 0.93, 0.065)),
    }
    s = sim.savings(curves, "e10")
    assert s == {"random": 0.0, "uncertainty": 0.5, "diverse": 0.0}  # diverse never gets there
    assert sim.savings(curves, "mean_e")["uncertainty"] == pytest.approx(0.5)


def test_summary_reports_the_best_strategy_its_spread_and_the_curves(sim):
    runs = {
        0: {"random": curve((0, 0.9, 0.08), (100, 0.92, 0.07), (200, 0.94, 0.06)),
            "uncertainty": curve((0, 0.9, 0.08), (100, 0.94, 0.06), (200, 0.95, 0.05))},
        1: {"random": curve((0, 0.9, 0.08), (100, 0.93, 0.07), (200, 0.94, 0.06)),
            "uncertainty": curve((0, 0.9, 0.08), (100, 0.93, 0.065), (200, 0.95, 0.05))},
    }  # fmt: skip
    report = sim.summarise(runs)
    assert report["best_strategy"] == "uncertainty"
    by_seed = report["savings"]["e10"]["by_strategy"]["uncertainty"]["by_seed"]
    assert by_seed == {"0": 0.5, "1": 0.25}  # seed 1 reaches random's 0.94 at 150 labels
    assert report["label_savings"] == 0.375
    assert report["strategies"]["random"]["curve"][1] == [100, 0.925, 0.07]


def test_arguments_are_checked(sim):
    with pytest.raises(SystemExit):
        sim.parse_args(["--csv", "a", "--root", "b", "--json", "c", "--plot", "d",
                        "--strategies", "uncertainty"])  # fmt: skip
    args = sim.parse_args(["--csv", "a", "--root", "b", "--json", "c", "--plot", "d", "--quick",
                           "--rounds", "2"])  # fmt: skip
    assert sim.plan_of(args).rounds == 2 and sim.plan_of(args).per_round == sim.QUICK.per_round


@pytest.mark.slow
def test_a_tiny_simulation_writes_curves_savings_and_a_plot(tmp_path):
    csv = write_dataset(tmp_path / "faces", 40, seed=3)
    out, png = tmp_path / "al.json", tmp_path / "al.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--csv", str(csv), "--root", str(csv.parent),
         "--json", str(out), "--plot", str(png), "--quick", "--seeds", "2", "--rounds", "2",
         "--per-round", "4", "--epochs", "1", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"random", "uncertainty", "diverse"}
    for data in report["strategies"].values():
        assert [p[0] for p in data["curve"]] == [0, 4, 8]
        assert set(data["seeds"]) == {"0", "1"}
        assert all(0 <= p[1] <= 1 and p[2] >= 0 for p in data["curve"])
    assert 0 <= report["label_savings"] <= 1
    assert report["savings"]["e10"]["best"] in {"uncertainty", "diverse"}
    assert png.stat().st_size > 10_000
    assert "label_savings" in done.stdout
