"""Scoring pupil predictions against ground truth: pure functions, no I/O besides the plot.

The metric is Jesorsky et al. (2001): e = max(d_left, d_right) / ||true_left - true_right||,
the worse eye's distance to its true pupil in units of the true interocular distance.
e <= 0.05 is roughly "inside the pupil", 0.10 "inside the iris", 0.25 "on the eye".

Left/right here always mean the IMAGE's left/right (not the subject's).
"""

from __future__ import annotations

import csv
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.keypoints import FaceKeypoints

TRUTH_COLUMNS: tuple[str, ...] = ("file", "left_x", "left_y", "right_x", "right_y")
THRESHOLDS: dict[str, float] = {"e05": 0.05, "e10": 0.10, "e25": 0.25}
FAILURE_THRESHOLD = 0.05  # e above this is a failure for `worst_20pct_failure_share`
LOW_CONFIDENCE_FRACTION = 0.2
CED_MAX_ERROR = 0.3


@dataclass(frozen=True)
class TruthRow:
    """One image's true pupils in pixels; `left` is the eye on the image's left."""

    file: str
    left: np.ndarray
    right: np.ndarray


@dataclass
class RowResult:
    """What one image scored: `error` is inf and `confidence` 0 when the face was missed."""

    file: str
    found: bool
    error: float
    confidence: float
    seconds: float
    error_message: str | None = None


def read_truth_csv(path: str | Path) -> list[TruthRow]:
    """Rows of a `file,left_x,left_y,right_x,right_y` CSV (extra columns are ignored).

    Raises ValueError naming the file and line for a missing column, an empty file name,
    a non-numeric or non-finite coordinate, or two eyes at the same point.
    """
    path = Path(path)
    rows: list[TruthRow] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in TRUTH_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} in header")
        reader.fieldnames = header
        for record in reader:
            line = reader.line_num
            values: dict[str, float] = {}
            for column in TRUTH_COLUMNS[1:]:
                raw = record.get(column)
                if raw is None:
                    raise ValueError(f"{path}:{line}: missing value for column {column!r}")
                try:
                    value = float(raw)
                except ValueError:
                    raise ValueError(
                        f"{path}:{line}: column {column!r} is not a number: {raw!r}"
                    ) from None
                if not math.isfinite(value):
                    raise ValueError(f"{path}:{line}: column {column!r} is not finite: {raw!r}")
                values[column] = value
            file = (record.get("file") or "").strip()
            if not file:
                raise ValueError(f"{path}:{line}: empty 'file' value")
            left = np.array([values["left_x"], values["left_y"]], dtype=np.float64)
            right = np.array([values["right_x"], values["right_y"]], dtype=np.float64)
            if np.array_equal(left, right):
                raise ValueError(f"{path}:{line}: left and right eye are the same point")
            rows.append(TruthRow(file=file, left=left, right=right))
    return rows


# LFW file names: First_Last_0001 (a capitalised first name, more name parts, 4 digits).
_LFW_NAME = re.compile(r"([A-Z][\w'.-]*(?:_[A-Za-z][\w'.-]*)+)_\d{4}")


def person_of(file: str) -> str:
    """Who a labelled file shows, for splits that keep each person on one side.

    LFW names (`Aaron_Guiel_0001.jpg`) name the person; any other file is its own group (MTFL's
    web images are all different people, and nothing better is known about a user's files).
    """
    match = _LFW_NAME.fullmatch(Path(file).stem)
    return match.group(1) if match else file


def group_split(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask selecting about `fraction` of the rows, whole groups at a time.

    Each group is assigned by a hash of (seed, group), so the split of a face does not change
    when other faces are added: a face kept aside once stays aside. With two or more groups
    both sides get at least one (the groups hashing nearest the threshold move over).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), not {fraction}")
    threshold = int(fraction * 2**32)
    hashes = {g: zlib.crc32(f"{seed}:{g}".encode()) for g in dict.fromkeys(groups.tolist())}
    picked = {g: h < threshold for g, h in hashes.items()}
    if len(hashes) >= 2 and len(set(picked.values())) == 1:
        nearest = min(hashes, key=lambda g: abs(hashes[g] - threshold))
        picked[nearest] = not picked[nearest]
    return np.array([picked[g] for g in groups.tolist()], dtype=bool)


def normalised_error(pred_left: np.ndarray, pred_right: np.ndarray, truth: TruthRow) -> float:
    """Jesorsky's e: the worse eye's pixel error over the true interocular distance."""
    interocular = float(np.linalg.norm(truth.left - truth.right))
    if interocular == 0.0:
        raise ValueError(f"{truth.file}: true eyes coincide; normalised error is undefined")
    d_left = float(np.linalg.norm(np.asarray(pred_left, dtype=np.float64) - truth.left))
    d_right = float(np.linalg.norm(np.asarray(pred_right, dtype=np.float64) - truth.right))
    return max(d_left, d_right) / interocular


def face_error(face: FaceKeypoints, truth: TruthRow) -> float:
    """e of one detected face against the truth, pairing eyes by image side."""
    return normalised_error(face.image_left_pupil, face.image_right_pupil, truth)


def match_face(faces: Sequence[FaceKeypoints], truth: TruthRow) -> FaceKeypoints | None:
    """The face whose box holds the midpoint of the true eyes (the lowest e among several).

    None when no box contains it: the annotated face was missed.
    """
    mx, my = (truth.left + truth.right) / 2.0
    candidates = [f for f in faces if f.box[0] <= mx <= f.box[2] and f.box[1] <= my <= f.box[3]]
    if not candidates:
        return None
    return min(candidates, key=lambda f: face_error(f, truth))


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def confidence_spearman(confidences: np.ndarray, errors: np.ndarray) -> float | None:
    """Spearman rho of (-confidence, error): > 0 when low confidence goes with high error.

    None with fewer than 3 faces or when either side is constant (rho undefined).
    """
    from scipy.stats import spearmanr

    confidences = np.asarray(confidences, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) < 3 or np.ptp(confidences) == 0 or np.ptp(errors) == 0:
        return None
    rho = spearmanr(-confidences, errors).statistic
    return _none_if_nan(float(rho))


def low_confidence_failure_share(
    confidences: np.ndarray,
    errors: np.ndarray,
    fraction: float = LOW_CONFIDENCE_FRACTION,
    threshold: float = FAILURE_THRESHOLD,
) -> float | None:
    """Share of the failures (e > threshold) found in the least confident `fraction` of faces.

    The group is the ceil(fraction * n) faces of lowest confidence (ties broken by input
    order). A confidence that ranks errors well scores near 1, a useless one near `fraction`.
    None when there are no faces or no failures.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    failures = errors > threshold
    if len(errors) == 0 or not failures.any():
        return None
    k = math.ceil(fraction * len(errors))
    lowest = np.argsort(confidences, kind="stable")[:k]
    return float(failures[lowest].sum() / failures.sum())


def summarise(results: Sequence[RowResult], method: str, variant: str) -> dict:
    """Headline numbers for one run; fractions are of ALL rows (a miss is a failure).

    Statistics that are undefined (no face found, no failures) are None, so the dict is
    strict JSON. `ms_per_image` is the median over the images that could be read.
    """
    n = len(results)
    errors = np.array([r.error if r.found else math.inf for r in results], dtype=np.float64)
    found = np.array([r.found for r in results], dtype=bool)
    found_errors = errors[found]
    found_conf = np.array([r.confidence for r in results], dtype=np.float64)[found]
    read_seconds = [r.seconds for r in results if r.error_message is None]
    summary: dict = {
        "method": method,
        "variant": variant,
        "faces": n,
        "found_rate": float(found.mean()) if n else None,
    }
    for key, threshold in THRESHOLDS.items():
        summary[key] = float(np.mean(errors <= threshold)) if n else None
    summary["mean_e"] = float(found_errors.mean()) if len(found_errors) else None
    summary["median_e"] = float(np.median(found_errors)) if len(found_errors) else None
    summary["ms_per_image"] = 1000.0 * float(np.median(read_seconds)) if read_seconds else None
    summary["failed_to_read"] = sum(r.error_message is not None for r in results)
    summary["confidence_spearman"] = confidence_spearman(found_conf, found_errors)
    summary["worst_20pct_failure_share"] = low_confidence_failure_share(found_conf, found_errors)
    return summary


def ced(errors: Iterable[float], grid: np.ndarray) -> np.ndarray:
    """Fraction of `errors` <= each grid value (inf, i.e. a miss, never counts)."""
    errors = np.sort(np.asarray(list(errors), dtype=np.float64))
    if len(errors) == 0:
        return np.zeros_like(grid, dtype=np.float64)
    return np.searchsorted(errors, grid, side="right") / len(errors)


def plot_ced(curves: Mapping[str, np.ndarray], path: str | Path, title: str) -> None:
    """Cumulative error distribution, one line per label, saved as a PNG at `path`.

    Each curve is the errors of ALL rows, with inf for a miss.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.linspace(0.0, CED_MAX_ERROR, 301)
    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, errors in curves.items():
        errors = np.asarray(errors, dtype=np.float64)
        n = max(len(errors), 1)
        e05 = float(np.sum(errors <= 0.05)) / n
        e10 = float(np.sum(errors <= 0.10)) / n
        ax.plot(grid, ced(errors, grid), label=f"{label} (e05 {e05:.1%}, e10 {e10:.1%})")
    for threshold in THRESHOLDS.values():
        ax.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0.0, CED_MAX_ERROR)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("normalised error e (max eye error / interocular distance)")
    ax.set_ylabel("fraction of images with error <= e")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def plot_learning_curve(
    history: Sequence[Mapping[str, float]],
    path: str | Path,
    title: str,
    final: Mapping[str, float] | None = None,
) -> None:
    """Training loss (px, left axis) and validation e05/e10 (right axis) per epoch, as a PNG.

    `history` holds one record per epoch: `epoch`, `loss_px` and, on some epochs, `val_e05`
    and `val_e10` (as `backend.regressor.training.fit` returns them: the raw network, before
    the label offset). `final` ({val_e05, val_e10}) marks the finished version's scores.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["loss_px"] for r in history], color="tab:grey", label="training loss (px)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 loss, crop pixels")
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    lowest = 1.0
    for key, colour in (("val_e05", "tab:blue"), ("val_e10", "tab:green")):
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            right.plot(xs, ys, marker="o", color=colour, label=f"validation {key[4:]} (network)")
            lowest = min(lowest, *ys)
        if final is not None and key in final:
            label = f"version's {key[4:]} (with label offset)"
            right.plot([epochs[-1]], [final[key]], marker="*", markersize=14, color=colour,
                       linestyle="none", label=label)  # fmt: skip
            lowest = min(lowest, final[key])
    right.set_ylim(max(0.0, lowest - 0.1), 1.0)
    right.set_ylabel("fraction of validation faces")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="center right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
