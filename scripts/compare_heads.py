"""Heatmap + soft-argmax head vs the reference's global-pooled dense head (docs/benchmarks.md).

    python scripts/compare_heads.py --csv eyes.csv --root DIR [--epochs 20] [--test-fraction 0.2]

Both heads sit on the same compact convolutional backbone (8-16-32-64 channels, stride-2
downsampling), learn the same labels with the same augmentation, seed and schedule, and are
scored on the same held-out people (no label offset: this compares networks). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/compare_heads.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.evaluation import THRESHOLDS, group_split, read_truth_csv
from backend.regressor.dataset import build_samples


def dense_head_network(config):
    """The reference's design: conv backbone -> global average pool -> dense -> (x, y)."""
    from backend.regressor import network as net

    keras, tf = net.keras, net.tf
    h, w = config.input_height, config.input_width
    crops = keras.Input((h, w, 1), name="crop")
    x = net.Standardise(name="standardise")(crops)
    for level, width in enumerate(config.widths):
        x = net._conv(x, width, stride=1 if level == 0 else 2, name=f"c{level}")
        x = net._conv(x, width, name=f"c{level}b")
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    xy = keras.layers.Dense(2)(x)
    xy = keras.layers.Lambda(lambda t: t + [w / 2.0, h / 2.0], name="xy")(xy)
    spread = keras.layers.Lambda(lambda t: tf.ones_like(t[:, :1]), name="spread")(xy)
    return keras.Model(crops, {"xy": xy, "spread": spread})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    samples, _ = build_samples(read_truth_csv(args.csv), args.root, args.workers)
    test = group_split(samples.groups, args.test_fraction, seed=0)
    train, held_out = samples.subset(~test), samples.subset(test)

    from backend.regressor import training

    report: dict = {"train_faces": len(train), "test_faces": len(held_out), "epochs": args.epochs}
    for name, builder in (("heatmap", training.build_network), ("dense", dense_head_network)):
        training.build_network = builder  # fit() builds its network through this name
        started = time.perf_counter()
        model, history = training.fit(train, None, training.TrainConfig(epochs=args.epochs))
        errors = training.face_errors(training.predict_samples(model, held_out).xy, held_out)
        report[name] = {
            **{k: round(float(np.mean(errors <= t)), 4) for k, t in THRESHOLDS.items()},
            "weights": int(model.count_params()),
            "final_loss_px": round(history[-1]["loss_px"], 3),
            "seconds": round(time.perf_counter() - started),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
