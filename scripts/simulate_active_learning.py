"""Does ranking tasks pay? Simulated annotators on a labelled set, one learning curve per strategy.

    python scripts/simulate_active_learning.py --csv eyes.csv --root DIR --json OUT.json \
        --plot OUT.png [--seed S] [--seeds 3] [--quick]

The CSV's truth plays the annotator. Per seed, the faces are split by person into a fixed test
part and a pool. Round 0 is what a new project gets for free: a regressor trained only on the
coarse detector's labels of the pool (coarse-to-fine, no person involved). Then, per strategy,
each round picks --per-round tasks of the pool by the strategy, reveals their truth, and
retrains exactly as the backend's training loop does (backend/retrain.py): people's faces at
weight 1 (a fifth of them held out to calibrate the confidence), up to --coarse-max
detector-labelled pool faces at TRAIN_COARSE_WEIGHT, starting from the current model's
weights. Every round is scored on the test part (e05, e10, mean e).

Strategies (backend/active_learning.py): `random`; `uncertainty` (lowest served confidence
first: the task score Label Studio sorts by); `diverse` (uncertainty + one task per k-means
cluster of a cheap eye-crop embedding).

`label_savings`: for the best strategy, the fraction fewer labels it needs to reach the accuracy
random sampling reaches with the whole budget (linear interpolation between rounds), averaged
over seeds; reported for e10 and mean e, with each seed's value (the spread).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/simulate_active_learning.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.active_learning import STRATEGIES, crop_embedding, select_batch
from backend.evaluation import group_split, read_truth_csv
from backend.regressor.dataset import FaceSamples, build_samples, concatenate
from backend.settings import Settings

# TensorFlow is imported in main(): the crop workers are spawned processes that import this
# module again and do not need it.

log = logging.getLogger("simulate_active_learning")

TEST_FRACTION = 0.25
VAL_FRACTION = 0.2  # of people's labels, as backend/retrain.py
METRICS = ("e10", "mean_e")


@dataclass(frozen=True)
class Plan:
    """How big the simulation is."""

    rounds: int
    per_round: int
    first_epochs: int  # round 0: the coarse-label regressor
    epochs: int  # each retraining
    coarse_max: int  # detector-labelled faces per retraining (TRAIN_MAX_COARSE_TASKS)
    coarse_weight: float


FULL = Plan(rounds=8, per_round=100, first_epochs=12, epochs=6, coarse_max=800, coarse_weight=0.3)
QUICK = Plan(rounds=4, per_round=40, first_epochs=4, epochs=3, coarse_max=200, coarse_weight=0.3)
QUICK_FACES = 1200


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="truth: file,left_x,left_y,...")
    parser.add_argument("--root", type=Path, required=True, help="image paths are relative to it")
    parser.add_argument("--json", type=Path, required=True, help="results (curves, label_savings)")
    parser.add_argument("--plot", type=Path, required=True, help="learning curves PNG")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (seed, seed+1, ...)")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK_FACES} faces, {QUICK.rounds} rounds of {QUICK.per_round}: minutes, for CI",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, help="use only the first N rows of the CSV")
    parser.add_argument("--rounds", type=int, help="rounds of labelling (default: by mode)")
    parser.add_argument("--per-round", type=int, help="labels per round (default: by mode)")
    parser.add_argument("--epochs", type=int, help="epochs per retraining (default: by mode)")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes cutting eye crops")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown or "random" not in args.strategies:
        parser.error(f"--strategies must include random and only {', '.join(STRATEGIES)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    """The mode's plan with the command line's overrides."""
    plan = QUICK if args.quick else FULL
    overrides = {"rounds": args.rounds, "per_round": args.per_round, "epochs": args.epochs}
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# One seed


def with_coarse_truth(samples: FaceSamples) -> FaceSamples:
    """The same faces with the coarse detector's pupils as their labels."""
    return replace(samples, truth=samples.coarse)


class Simulation:
    """One seed: a test part, a pool, the round-0 model, and one learning curve per strategy."""

    def __init__(self, samples: FaceSamples, plan: Plan, seed: int, progress: bool) -> None:
        from backend.regressor.training import TrainConfig

        self.plan, self.seed, self.progress = plan, seed, progress
        test_mask = group_split(samples.groups, TEST_FRACTION, seed)
        self.test, self.pool = samples.subset(test_mask), samples.subset(~test_mask)
        self.embedding = crop_embedding(self.pool.pixels)
        self.config = TrainConfig(labels="truth", epochs=plan.epochs, seed=seed)
        self.first = self._first_model()

    def _first_model(self):
        """Round 0: a regressor trained on the coarse detector's labels of the whole pool."""
        from backend.regressor.training import fit, label_offset

        train = with_coarse_truth(self.pool)
        config = replace(self.config, epochs=self.plan.first_epochs)
        model, _ = fit(train, None, config, progress=self.progress)
        return model, label_offset(model, train, "truth")

    def score(self, model, offset) -> dict[str, float]:
        """e05, e10 and mean e of a model (with its label offset) on the test part."""
        from backend.regressor.training import face_errors, predict_samples

        errors = face_errors(predict_samples(model, self.test, offset).xy, self.test)
        return {
            "e05": float(np.mean(errors <= 0.05)),
            "e10": float(np.mean(errors <= 0.10)),
            "mean_e": float(np.mean(errors)),
        }

    def confidence(self, model, offset, calibration, candidates: np.ndarray) -> np.ndarray:
        """Per candidate pool face, the served confidence: P(both pupils within 0.05), as
        /predict says (only the candidates are predicted: labelled faces are not ranked).

        Before any person's label exists (round 0) the served confidence of the coarse-trained
        model cannot be calibrated, so the coarse detector's own calibrated confidence ranks.
        """
        from backend.regressor.training import eye_cues, predict_samples
        from backend.regressor.uncertainty import eye_confidence

        faces = self.pool.subset(candidates)
        if calibration is None:
            return faces.coarse_confidence.prod(axis=1)
        prediction = predict_samples(model, faces, offset)
        return eye_confidence(eye_cues(prediction, faces), calibration).prod(axis=1)

    def retrain(self, model, labelled: np.ndarray, rng: np.random.Generator):
        """backend/retrain.py's run on the pool: people's faces + detector-labelled faces."""
        from backend.regressor.training import (
            eye_cues,
            eye_errors,
            fit,
            label_offset,
            predict_samples,
        )
        from backend.regressor.uncertainty import fit_calibration

        people = self.pool.subset(labelled)
        val_mask = group_split(people.groups, VAL_FRACTION, self.seed)
        if val_mask.all() or not val_mask.any():
            val_mask = np.arange(len(people)) % 5 == 0
        val, train_people = people.subset(val_mask), people.subset(~val_mask)
        unlabelled = np.setdiff1d(np.arange(len(self.pool)), labelled)
        coarse = rng.choice(unlabelled, min(self.plan.coarse_max, len(unlabelled)), replace=False)
        train = concatenate(train_people, with_coarse_truth(self.pool.subset(np.sort(coarse))))
        weights = np.concatenate([
            np.ones(len(train_people), np.float32),
            np.full(len(coarse), self.plan.coarse_weight, np.float32),
        ])  # fmt: skip
        new, _ = fit(train, None, self.config, progress=False, weights=weights, initial=model)
        offset = label_offset(new, train_people, "truth")
        prediction = predict_samples(new, val, offset)
        calibration = fit_calibration(eye_cues(prediction, val), eye_errors(prediction.xy, val))
        return new, offset, calibration

    def curve(self, strategy: str) -> list[dict]:
        """Labels used and test accuracy after each round of `strategy`."""
        from tqdm import tqdm

        rng = np.random.default_rng([self.seed, STRATEGIES.index(strategy)])
        model, offset = self.first
        calibration = None
        labelled = np.zeros(0, dtype=int)
        points = [{"labels": 0, **self.score(model, offset), "seconds": 0.0}]
        bar = tqdm(
            range(self.plan.rounds), desc=f"seed {self.seed} {strategy}", unit="round",
            file=sys.stderr, disable=not self.progress,
        )  # fmt: skip
        for _ in bar:
            started = time.perf_counter()
            candidates = np.setdiff1d(np.arange(len(self.pool)), labelled)
            confidence = self.confidence(model, offset, calibration, candidates)
            picked = select_batch(
                strategy, confidence, self.plan.per_round, rng, self.embedding[candidates]
            )
            labelled = np.concatenate([labelled, candidates[picked]])
            model, offset, calibration = self.retrain(model, labelled, rng)
            point = {"labels": len(labelled), **self.score(model, offset)}
            point["seconds"] = round(time.perf_counter() - started, 1)
            points.append(point)
            bar.set_postfix(e10=round(point["e10"], 4), mean_e=round(point["mean_e"], 4))
            log.info("seed=%s strategy=%s %s", self.seed, strategy, point)
        return points


# ---------------------------------------------------------------------------------------------
# Labels needed, savings


def labels_to_reach(curve: list[dict], metric: str, target: float) -> float | None:
    """Fewest labels at which `curve` reaches `target` (linear between rounds); None if never."""
    better = (lambda a, b: a <= b) if metric == "mean_e" else (lambda a, b: a >= b)
    for before, after in zip(curve, curve[1:], strict=False):
        if better(before[metric], target):
            return float(before["labels"])
        if better(after[metric], target):
            span = after[metric] - before[metric]
            t = 1.0 if span == 0 else (target - before[metric]) / span
            return before["labels"] + t * (after["labels"] - before["labels"])
    return float(curve[0]["labels"]) if better(curve[0][metric], target) else None


def savings(curves: dict[str, list[dict]], metric: str) -> dict[str, float]:
    """Per strategy, 1 - labels it needs / labels random used to reach random's final accuracy.

    A strategy that never gets there scores 0 (it saves nothing)."""
    budget = curves["random"][-1]["labels"]
    target = curves["random"][-1][metric]
    out = {}
    for name, curve in curves.items():
        needed = labels_to_reach(curve, metric, target)
        out[name] = 0.0 if needed is None else round(1.0 - needed / budget, 4)
    return out


def summarise(runs: dict[int, dict[str, list[dict]]]) -> dict:
    """Mean curves over seeds, per-seed savings, and the headline label_savings (e10)."""
    strategies = list(next(iter(runs.values())))
    mean_curves = {}
    for name in strategies:
        rounds = zip(*(runs[seed][name] for seed in runs), strict=True)
        mean_curves[name] = [
            {"labels": points[0]["labels"],
             **{m: round(float(np.mean([p[m] for p in points])), 5) for m in ("e05", *METRICS)}}
            for points in rounds
        ]  # fmt: skip
    per_seed = {m: {seed: savings(curves, m) for seed, curves in runs.items()} for m in METRICS}
    report: dict = {"strategies": {}, "savings": {}}
    for name in strategies:
        report["strategies"][name] = {
            "curve": [[p["labels"], p["e10"], p["mean_e"]] for p in mean_curves[name]],
            "curve_points": mean_curves[name],
            "seeds": {str(seed): runs[seed][name] for seed in runs},
        }
    for m in METRICS:
        by_strategy = {
            name: [per_seed[m][seed][name] for seed in runs]
            for name in strategies
            if name != "random"
        }
        best = max(by_strategy, key=lambda n: np.mean(by_strategy[n]))
        report["savings"][m] = {
            "best": best,
            "mean": round(float(np.mean(by_strategy[best])), 4),
            "by_strategy": {
                name: {"mean": round(float(np.mean(v)), 4), "min": min(v), "max": max(v),
                       "by_seed": dict(zip(map(str, runs), v, strict=True))}
                for name, v in by_strategy.items()
            },
        }  # fmt: skip
    report["label_savings"] = report["savings"]["e10"]["mean"]
    report["label_savings_metric"] = "e10"
    report["best_strategy"] = report["savings"]["e10"]["best"]
    return report


def plot(report: dict, path: Path) -> None:
    """Learning curves (mean over seeds, min-max band) for e10 and mean e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in zip(
        axes, METRICS, ("faces within 0.10 (e10), higher is better", "mean e, lower is better"),
        strict=True,
    ):  # fmt: skip
        for name, data in report["strategies"].items():
            seeds = list(data["seeds"].values())
            labels = [p["labels"] for p in seeds[0]]
            values = np.array([[p[metric] for p in curve] for curve in seeds])
            line = ax.plot(labels, values.mean(axis=0), marker="o", ms=3, label=name)[0]
            ax.fill_between(labels, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.15)  # fmt: skip
        ax.set_xlabel("labels used")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    saved = report["savings"]["e10"]
    fig.suptitle(
        f"Active learning on MTFL: {saved['best']} needs {saved['mean']:.0%} fewer labels than "
        f"random for random's final e10 ({report['config']['seeds']} seeds)", fontsize=11,
    )  # fmt: skip
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    plan = plan_of(args)
    try:
        rows = read_truth_csv(args.csv)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limit = args.limit or (QUICK_FACES if args.quick else None)
    if limit:
        rows = rows[:limit]
    started = time.perf_counter()
    samples, skipped = build_samples(rows, args.root, workers=args.workers,
                                     progress=not args.quiet)  # fmt: skip
    need = plan.rounds * plan.per_round
    if len(samples) < 2 * need:
        print(f"error: {len(samples)} usable faces; {plan.rounds} rounds of {plan.per_round} "
              f"need at least {2 * need}", file=sys.stderr)  # fmt: skip
        return 2
    runs: dict[int, dict[str, list[dict]]] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        simulation = Simulation(samples, plan, seed, progress=not args.quiet)
        runs[seed] = {name: simulation.curve(name) for name in args.strategies}
    report = summarise(runs)
    report["config"] = {
        "csv": str(args.csv), "faces": len(samples), "skipped": len(skipped),
        "seeds": args.seeds, "first_seed": args.seed, "quick": args.quick,
        "test_fraction": TEST_FRACTION, "plan": plan.__dict__,
        "coarse_weight_default": Settings.from_env({}).train_coarse_weight,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.plot)
    for m in METRICS:
        s = report["savings"][m]
        print(f"{m}: best {s['best']} saves {s['mean']:.1%} of the labels "
              f"(per strategy: {json.dumps(s['by_strategy'])})")  # fmt: skip
    print(f"label_savings {report['label_savings']:.3f} ({report['best_strategy']}); "
          f"{report['config']['seconds']:.0f} s; {args.json}, {args.plot}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
