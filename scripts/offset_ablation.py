"""How much of a regressor version's accuracy is its label offset? (docs/benchmarks.md)

    python scripts/offset_ablation.py --csv test.csv --root DIR --model-dir DIR [--version V]

Cuts the labelled faces' eye crops once, then scores four models on the same found faces: the
coarse detector and the version's network, each without and with the version's label offset
(`backend.regressor.training.label_offset`). Prints JSON: e05/e10/e25 per model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/offset_ablation.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.evaluation import THRESHOLDS, read_truth_csv
from backend.model_store import ModelStore, ModelStoreError
from backend.regressor.dataset import build_samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--version", help="default: the promoted version")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        stored = ModelStore(args.model_dir).chosen(args.version)
    except ModelStoreError as exc:
        parser.error(str(exc))
    samples, _ = build_samples(read_truth_csv(args.csv), args.root, args.workers)

    from backend.regressor.training import face_errors, predict_samples
    from backend.regressor.version import load_version

    version = load_version(stored)
    shift = samples.image_offset_to_crop(version.label_offset)
    network = predict_samples(version.model, samples).xy
    models = {
        "coarse": samples.coarse,
        "coarse + label offset": samples.coarse + shift,
        "network alone": network,
        "network + label offset (the version)": network + shift,
    }
    report: dict = {"version": version.name, "found_faces": len(samples),
                    "label_offset_px": version.label_offset.tolist()}  # fmt: skip
    for name, points in models.items():
        errors = face_errors(points, samples)
        report[name] = {k: round(float(np.mean(errors <= t)), 4) for k, t in THRESHOLDS.items()}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
