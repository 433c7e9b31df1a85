"""Train a new regressor version from a labelled CSV; prints a JSON summary.

    python scripts/train.py --csv eyes.csv --root DIR --model-dir DIR \
        [--labels truth|coarse] [--epochs N] [--backbone HANDLE] [--seed S] [--promote]

Every image goes through the coarse pipeline; the face holding the labelled eyes gives two eye
crops. `--labels truth` learns the CSV's pupils, `--labels coarse` the coarse detector's own
(no human label at all; the CSV then only validates). A part of the people (`--val-fraction`,
whole people at a time) is held out to score the version and calibrate its confidence. The
version is written atomically under MODEL_DIR/versions/; `--promote` also makes it serve.
`--backbone` takes a TF-Hub handle (URL or local SavedModel directory) instead of the compact
CNN. Images that cannot be read or show no face are skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.evaluation import group_split, read_truth_csv
from backend.model_store import ModelStore
from backend.regressor.dataset import build_samples

# TensorFlow is imported in main(), not here: the crop workers are spawned processes that
# import this module again, and do not need it.

log = logging.getLogger("train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--csv", type=Path, required=True, help="file,left_x,left_y,right_x,right_y"
    )
    parser.add_argument("--root", type=Path, required=True, help="image paths are relative to it")
    parser.add_argument("--model-dir", type=Path, required=True, help="the model store (MODEL_DIR)")
    parser.add_argument("--labels", choices=("truth", "coarse"), default="truth")
    parser.add_argument("--epochs", type=int, help="default: TrainConfig.epochs (40)")
    parser.add_argument(
        "--backbone", default="compact", help="'compact' (default) or a TF-Hub handle / directory"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="people held out")
    parser.add_argument("--limit", type=int, help="use only the first N rows of the CSV")
    parser.add_argument("--workers", type=int, default=2, help="processes cutting eye crops")
    parser.add_argument("--promote", action="store_true", help="make the new version serve")
    parser.add_argument("--plot", type=Path, help="learning curve PNG (loss, val e05/e10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error("--val-fraction must be in (0, 1)")
    if args.limit is not None and args.limit < 2:
        parser.error("--limit must be >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        rows = read_truth_csv(args.csv)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    rows = rows[: args.limit] if args.limit else rows
    samples, skipped = build_samples(rows, args.root, args.workers, progress=not args.quiet)
    val = group_split(samples.groups, args.val_fraction, seed=args.seed + 1)
    if val.all() or not val.any():
        log.error("%d usable faces cannot be split into training and validation", len(samples))
        return 2
    source = {
        "csv": str(args.csv),
        "csv_sha256": hashlib.sha256(args.csv.read_bytes()).hexdigest(),
        "rows": len(rows),
        "skipped": len(skipped),
    }
    from backend.regressor.network import NetworkConfig
    from backend.regressor.training import TrainConfig, train_version

    config = TrainConfig(
        labels=args.labels,
        **({"epochs": args.epochs} if args.epochs else {}),
        seed=args.seed,
        network=replace(NetworkConfig(), backbone=args.backbone),
    )
    store = ModelStore(args.model_dir)
    version, summary = train_version(
        store, samples.subset(~val), samples.subset(val), config, source, progress=not args.quiet
    )
    if args.plot is not None:
        from backend.evaluation import plot_learning_curve

        history = version.metadata["training"]["history"]
        title = f"{version.name} ({config.labels} labels, {summary['train_size']} faces)"
        plot_learning_curve(history, args.plot, title, final=summary)
    if args.promote:
        store.promote(
            version.name, reason=f"scripts/train.py --promote (val_e10 {summary['val_e10']:.3f})"
        )
    summary = {
        "model_version": version.name,
        "path": str(version.path),
        "promoted": args.promote,
        **summary,
        "skipped": len(skipped),
        "config": {"labels": config.labels, "epochs": config.epochs, "seed": config.seed,
                   "backbone": config.network.backbone},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(summary, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
