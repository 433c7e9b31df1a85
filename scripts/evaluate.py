"""Score pupil detectors against a ground-truth CSV; writes a JSON summary and a CED plot.

    python scripts/evaluate.py --csv eyes.csv --root DIR [--method coarse] [--variant NAME ...] \
        [--method regressor --model-dir DIR [--version V]] \
        --json OUT.json [--plot OUT.png] [--limit N] [--seed S] [--workers N]

`--method` may repeat (coarse and regressor curves then share one plot). For the coarse method
`--variant` may repeat and `--variant all` runs every variant; the regressor runs the model
store's promoted version, or `--version V`. With one run the JSON is its summary dict, with
several `{"results": [summary, ...]}`. Images that cannot be read are misses (logged, counted
in `failed_to_read`) and never stop the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/evaluate.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from backend.coarse.detector import DEFAULT_VARIANT, VARIANTS
from backend.evaluation import (
    RowResult,
    TruthRow,
    face_error,
    match_face,
    plot_ced,
    read_truth_csv,
    summarise,
)
from backend.images import ImageError, load_image
from backend.keypoints import FaceKeypoints

log = logging.getLogger("evaluate")

Predictor = Callable[[np.ndarray], list[FaceKeypoints]]
METHODS: tuple[str, ...] = ("coarse", "regressor")


def build_predictor(method: str, variant: str, args: argparse.Namespace) -> Predictor:
    """A function grey uint8 image -> faces; models are loaded here, once."""
    if method == "coarse":
        from backend.coarse.detector import CoarseDetector

        return CoarseDetector(variant=variant).detect
    if method == "regressor":
        from backend.model_store import ModelStore
        from backend.regressor.detector import RegressorDetector
        from backend.regressor.network import tf
        from backend.regressor.version import load_version

        if args.workers > 1:  # processes share the cores: one TF thread pool each
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        version = load_version(ModelStore(args.model_dir).get(variant))
        return RegressorDetector(version).detect
    raise ValueError(f"unknown method {method!r}")


# One predictor per process, built by `_init_worker` (in the pool's workers or in-process).
_predictor: Predictor | None = None


def _init_worker(method: str, variant: str, args: argparse.Namespace) -> None:
    global _predictor
    _predictor = build_predictor(method, variant, args)


def evaluate_row(row: TruthRow, root: Path) -> RowResult:
    """Load, detect and score one image; timing covers load + detection."""
    assert _predictor is not None, "worker not initialised"
    start = time.perf_counter()
    try:
        image = load_image(root / row.file)
    except (ImageError, OSError) as exc:
        return RowResult(
            file=row.file,
            found=False,
            error=float("inf"),
            confidence=0.0,
            seconds=time.perf_counter() - start,
            error_message=f"{type(exc).__name__}: {exc}",
        )
    faces = _predictor(image.grey)
    seconds = time.perf_counter() - start
    face = match_face(faces, row)
    if face is None:
        return RowResult(row.file, False, float("inf"), 0.0, seconds)
    return RowResult(row.file, True, face_error(face, row), float(face.confidence), seconds)


def run_variant(
    rows: Sequence[TruthRow], root: Path, method: str, variant: str, args: argparse.Namespace
) -> list[RowResult]:
    """Every row's result, in row order, with a progress bar on stderr."""
    work = partial(evaluate_row, root=root)
    bar = partial(tqdm, total=len(rows), desc=f"{method}/{variant}", unit="img", file=sys.stderr)
    results: list[RowResult] = []
    with logging_redirect_tqdm():
        if args.workers <= 1:
            _init_worker(method, variant, args)
            for result in bar(map(work, rows)):
                _log_failure(result)
                results.append(result)
        else:
            # spawn: no fork of a process that holds dlib/OpenCV (or later TensorFlow) threads
            context = multiprocessing.get_context("spawn")
            with context.Pool(
                args.workers, initializer=_init_worker, initargs=(method, variant, args)
            ) as pool:
                for result in bar(pool.imap(work, rows, chunksize=4)):
                    _log_failure(result)
                    results.append(result)
    return results


def _log_failure(result: RowResult) -> None:
    if result.error_message is not None:
        log.warning("could not read %s: %s", result.file, result.error_message)


def select_rows(rows: list[TruthRow], limit: int | None, seed: int) -> list[TruthRow]:
    """A deterministic random subset of `limit` rows (in file order); all rows without one."""
    if limit is None or limit >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def resolve_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(method, variant) pairs to run, in order; a regressor's variant is its version name."""
    runs: list[tuple[str, str]] = []
    for method in dict.fromkeys(args.method or ["coarse"]):
        if method == "coarse":
            runs += [("coarse", v) for v in resolve_variants(args.variant)]
        else:
            from backend.model_store import ModelStore

            runs.append(("regressor", ModelStore(args.model_dir).chosen(args.version).name))
    return runs


def resolve_variants(requested: list[str] | None) -> list[str]:
    if not requested:
        return [DEFAULT_VARIANT]
    available = list(VARIANTS)
    variants: list[str] = []
    for name in requested:
        for variant in available if name == "all" else [name]:
            if variant not in available:
                raise ValueError(f"unknown coarse variant {variant!r}; choose from {available}")
            if variant not in variants:
                variants.append(variant)
    return variants


def format_table(summaries: Sequence[dict]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"{'variant':<22} {'found':>6} {'e05':>6} {'e10':>6} {'e25':>6} {'mean_e':>7} {'ms':>7}"
    ]
    for s in summaries:
        lines.append(
            f"{s['variant']:<22} {num(s['found_rate'], '6.3f')} {num(s['e05'], '6.3f')} "
            f"{num(s['e10'], '6.3f')} {num(s['e25'], '6.3f')} {num(s['mean_e'], '7.4f')} "
            f"{num(s['ms_per_image'], '7.1f')}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--csv", type=Path, required=True, help="file,left_x,left_y,right_x,right_y"
    )
    parser.add_argument("--root", type=Path, required=True, help="image paths are relative to it")
    parser.add_argument(
        "--method", choices=METHODS, action="append", help="repeatable (default: coarse)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        help=f"coarse variant, repeatable; 'all' for every one (default: {DEFAULT_VARIANT})",
    )
    parser.add_argument("--model-dir", type=Path, help="the regressor's model store")
    parser.add_argument("--version", help="regressor version (default: the promoted one)")
    parser.add_argument("--json", type=Path, required=True, help="summary output")
    parser.add_argument("--plot", type=Path, help="cumulative error distribution PNG")
    parser.add_argument("--limit", type=int, help="evaluate a random subset of N rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if "regressor" in (args.method or []) and args.model_dir is None:
        parser.error("--method regressor needs --model-dir")
    try:
        args.runs = resolve_runs(args)
    except (ValueError, RuntimeError) as exc:  # ModelStoreError is a RuntimeError
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        rows = read_truth_csv(args.csv)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    rows = select_rows(rows, args.limit, args.seed)
    labels = [f"{method}/{variant}" for method, variant in args.runs]
    log.info("%d rows from %s, runs %s", len(rows), args.csv, ", ".join(labels))

    summaries: list[dict] = []
    curves: dict[str, np.ndarray] = {}
    for (method, variant), label in zip(args.runs, labels, strict=True):
        results = run_variant(rows, args.root, method, variant, args)
        summaries.append(summarise(results, method, variant))
        curves[label] = np.array([r.error for r in results], dtype=np.float64)

    print(format_table(summaries))
    payload = summaries[0] if len(summaries) == 1 else {"results": summaries}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    if args.plot is not None:
        methods = " vs ".join(dict.fromkeys(method for method, _ in args.runs))
        title = f"{methods} on {args.csv.name} ({len(rows)} images)"
        plot_ced(curves, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
