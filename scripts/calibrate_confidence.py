"""Fit the coarse detector's confidence model (backend/coarse/confidence.py) on labelled faces.

    python scripts/calibrate_confidence.py --csv CSV --root DIR [--limit N] [--workers 2]

Runs the default coarse detector on every row, records each eye's cues and its error, fits a
logistic model of "pupil within 0.05 eye distances" on half of the people (split by person so
the same face never sits on both sides), and reports on the other half how well the face
confidence ranks face errors. Prints the coefficients to paste into confidence.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.calibration import fit_logistic  # noqa: E402
from backend.coarse import CoarseDetector  # noqa: E402
from backend.coarse.confidence import FEATURE_NAMES, pupil_confidence  # noqa: E402
from backend.evaluation import (  # noqa: E402
    TruthRow,
    confidence_spearman,
    face_error,
    low_confidence_failure_share,
    match_face,
    person_of,
    read_truth_csv,
)
from backend.images import ImageError, load_image  # noqa: E402

_DETECTOR: CoarseDetector | None = None
_ROOT = Path(".")


def _init(root: str) -> None:
    global _DETECTOR, _ROOT
    _DETECTOR, _ROOT = CoarseDetector(), Path(root)


def _row(row: TruthRow) -> list[tuple[np.ndarray, float, float]] | None:
    """[(cue vector, eye error / eye distance, face error)] for the image-left and -right eye."""
    assert _DETECTOR is not None
    try:
        image = load_image(_ROOT / row.file)
    except ImageError:
        return None
    analysed = _DETECTOR.analyse(image.grey)
    face = match_face([keypoints for keypoints, _ in analysed], row)
    if face is None:
        return None
    cues = next(c for keypoints, c in analysed if keypoints is face)
    distance = float(np.linalg.norm(row.left - row.right))
    errors = (
        float(np.linalg.norm(face.image_left_pupil - row.left)) / distance,
        float(np.linalg.norm(face.image_right_pupil - row.right)) / distance,
    )
    # cues[0] belongs to the subject's left eye = the image's right
    return [
        (cues[1].vector(), errors[0], face_error(face, row)),
        (cues[0].vector(), errors[1], face_error(face, row)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    rows = read_truth_csv(args.csv)
    if args.limit:
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in sorted(rng.permutation(len(rows))[: args.limit])]
    with get_context("spawn").Pool(args.workers, _init, (str(args.root),)) as pool:
        results = list(tqdm(pool.imap(_row, rows, chunksize=16), total=len(rows), desc="faces"))

    fit_x, fit_y, check = [], [], []
    for row, res in zip(rows, results, strict=True):
        if res is None:
            continue
        half = int(hashlib.sha1(person_of(row.file).encode()).hexdigest(), 16) % 2
        if half == 0:
            for vector, eye_err, _ in res:
                fit_x.append(vector)
                fit_y.append(float(eye_err <= 0.05))
        else:
            check.append(res)
    coefficients = fit_logistic(np.array(fit_x), np.array(fit_y))

    def face_conf(res: list, w: np.ndarray) -> float:
        p = [1.0 / (1.0 + np.exp(-(v @ w))) for v, _, _ in res]
        return float(p[0] * p[1])

    errors = np.array([res[0][2] for res in check])
    report = {"fit_eyes": len(fit_y), "check_faces": len(check)}
    for name, w in (("fitted", coefficients), ("current", None)):
        if w is None:
            from backend.coarse.confidence import COEFFICIENTS as w  # noqa: N811
        conf = np.array([face_conf(res, w) for res in check])
        report[name] = {
            "spearman": confidence_spearman(conf, errors),
            "worst_20pct_failure_share": low_confidence_failure_share(conf, errors),
            "mean_confidence": float(conf.mean()),
            "e05_rate": float(np.mean(errors <= 0.05)),
        }
    report["coefficients"] = dict(
        zip(FEATURE_NAMES, np.round(coefficients, 4).tolist(), strict=True)
    )
    print(json.dumps(report, indent=2))
    print("COEFFICIENTS = np.array([" + ", ".join(f"{c:.4f}" for c in coefficients) + "])")
    _ = pupil_confidence  # the model these coefficients feed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
