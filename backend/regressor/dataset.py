"""Training data for the regressor: labelled face photos -> canonical eye crops + targets.

Each image goes through the coarse pipeline (faces, 68 landmarks) exactly as it will at
inference, so the crops carry the landmarks' real placement errors and the model learns to
correct them. The face that holds the labelled eyes is kept; its two crops are cut larger than
the model's input (`SOURCE_GEOMETRY`) so augmentation can shift, turn and zoom them.

Both the true pupils and the coarse detector's own pupils are kept per face, in canonical crop
coordinates: `--labels truth` learns the first, `--labels coarse` the second (coarse-to-fine:
no human label at all), and the truth always scores validation.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backend.coarse.detector import CoarseDetector
from backend.evaluation import TruthRow, person_of
from backend.faces import Face
from backend.images import ImageError, load_image
from backend.keypoints import FaceKeypoints
from backend.regressor.crops import SOURCE_GEOMETRY, face_crops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceSamples:
    """N labelled faces, two canonical eye crops each (row 0: left_pupil's eye, mirrored).

    Points are (x, y) in the source crop's canonical frame. `scale` is crop pixels per image
    pixel per eye, so a crop distance / scale is an image distance; `to_image` maps a canonical
    displacement to an image one; `interocular` is the true pupil distance in image pixels (the
    unit of the normalised error e).
    """

    files: np.ndarray  # (N,) str
    groups: np.ndarray  # (N,) str: who is in the photo, for splits that never share a person
    pixels: np.ndarray  # (N, 2, H, W) uint8
    truth: np.ndarray  # (N, 2, 2) float32
    coarse: np.ndarray  # (N, 2, 2) float32
    coarse_confidence: np.ndarray  # (N, 2) float32: the coarse detector's per-eye confidence
    scale: np.ndarray  # (N, 2) float32
    to_image: np.ndarray  # (N, 2, 2, 2) float32: per eye, canonical -> image displacements
    interocular: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray) -> FaceSamples:
        """The faces at `index` (an integer or boolean array)."""
        return FaceSamples(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def image_offset_to_crop(self, offset: np.ndarray) -> np.ndarray:
        """(N, 2, 2) canonical displacements equal to one (dx, dy) image displacement."""
        return np.einsum("neij,j->nei", np.linalg.inv(self.to_image), np.asarray(offset))

    def crop_to_image_offset(self, delta: np.ndarray) -> np.ndarray:
        """(N, 2, 2) canonical displacements -> the same displacements in image pixels."""
        return np.einsum("neij,nej->nei", self.to_image, np.asarray(delta))

    def targets(self, labels: str) -> np.ndarray:
        """(N, 2, 2) points to learn: "truth" (people's labels) or "coarse" (the detector's)."""
        if labels == "truth":
            return self.truth
        if labels == "coarse":
            return self.coarse
        raise ValueError(f"labels must be 'truth' or 'coarse', not {labels!r}")


# ---------------------------------------------------------------------------------------------
# Building samples from images


_detector: CoarseDetector | None = None


def _init_worker() -> None:
    global _detector
    _detector = CoarseDetector()


def face_sample(detector: CoarseDetector, grey: np.ndarray, row: TruthRow) -> dict | None:
    """The labelled face of one image as a dict of FaceSamples fields; None when not found.

    The face is the one whose box holds the midpoint of the true eyes (the one with the lowest
    coarse error when several do), as in evaluation.
    """
    mx, my = (row.left + row.right) / 2.0
    best = None
    for face in detector.faces.detect(grey):
        x0, y0, x1, y1 = face.box
        if not (x0 <= mx <= x1 and y0 <= my <= y1):
            continue
        keypoints, _ = detector.keypoints_for(grey, face)
        error = max(
            np.linalg.norm(keypoints.image_left_pupil - row.left),
            np.linalg.norm(keypoints.image_right_pupil - row.right),
        )
        if best is None or error < best[0]:
            best = (error, face, keypoints)
    if best is None:
        return None
    _, face, keypoints = best
    return face_fields(grey, face, keypoints, row)


def face_fields(grey: np.ndarray, face: Face, keypoints: FaceKeypoints, row: TruthRow) -> dict:
    """One found face as a dict of FaceSamples fields, with `row`'s points as the truth."""
    crops = face_crops(grey, face.landmarks, SOURCE_GEOMETRY)
    # Row 0 is left_pupil: the subject's left eye, on the image's right.
    truth_image = (row.right, row.left)
    coarse_image = (keypoints.points[0], keypoints.points[1])
    return {
        "files": row.file,
        "pixels": np.clip(np.rint(crops.pixels), 0, 255).astype(np.uint8),
        "truth": np.stack([crops.from_image(r, truth_image[r])[0] for r in (0, 1)]),
        "coarse": np.stack([crops.from_image(r, coarse_image[r])[0] for r in (0, 1)]),
        "coarse_confidence": keypoints.confidences[:2],
        "scale": np.array([c.scale for c in crops.crops]),
        "to_image": np.stack([crops.linear_to_image(r) for r in (0, 1)]),
        "interocular": float(np.linalg.norm(row.left - row.right)),
    }


def _sample_row(row: TruthRow, root: Path) -> tuple[dict | None, str | None]:
    assert _detector is not None, "worker not initialised"
    try:
        image = load_image(root / row.file)
    except (ImageError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    sample = face_sample(_detector, image.grey, row)
    return sample, None if sample is not None else "no face holds the labelled eyes"


def build_samples(
    rows: Sequence[TruthRow], root: Path, workers: int = 1, progress: bool = True
) -> tuple[FaceSamples, list[tuple[str, str]]]:
    """Samples for every row whose face is found, and (file, why) for every row left out.

    An unreadable image or a missed face skips that row (logged), never the batch.
    """
    work = partial(_sample_row, root=Path(root))
    bar = partial(
        tqdm, total=len(rows), desc="eye crops", unit="img", file=sys.stderr, disable=not progress
    )
    found: list[dict] = []
    skipped: list[tuple[str, str]] = []

    def collect(outcomes: Iterable[tuple[dict | None, str | None]]) -> None:
        for row, (sample, why) in zip(rows, bar(outcomes), strict=True):
            if sample is None:
                log.info("sample skipped file=%s reason=%s", row.file, why)
                skipped.append((row.file, str(why)))
            else:
                found.append(sample)

    if workers <= 1:
        _init_worker()
        collect(map(work, rows))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker) as pool:
            collect(pool.imap(work, rows, chunksize=8))
    return stack_samples(found), skipped


def concatenate(*parts: FaceSamples) -> FaceSamples:
    """One FaceSamples holding every part's faces, in order."""
    return FaceSamples(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(FaceSamples)}
    )


def stack_samples(found: Sequence[dict]) -> FaceSamples:
    """FaceSamples from per-face dicts (as `face_sample` returns)."""
    h, w = SOURCE_GEOMETRY.size[1], SOURCE_GEOMETRY.size[0]
    files = np.array([s["files"] for s in found], dtype=str)
    return FaceSamples(
        files=files,
        groups=np.array([person_of(f) for f in files], dtype=str),
        pixels=np.stack([s["pixels"] for s in found])
        if found
        else np.zeros((0, 2, h, w), np.uint8),
        truth=np.array([s["truth"] for s in found], dtype=np.float32).reshape(-1, 2, 2),
        coarse=np.array([s["coarse"] for s in found], dtype=np.float32).reshape(-1, 2, 2),
        coarse_confidence=np.array(
            [s["coarse_confidence"] for s in found], dtype=np.float32
        ).reshape(-1, 2),
        scale=np.array([s["scale"] for s in found], dtype=np.float32).reshape(-1, 2),
        to_image=np.array([s["to_image"] for s in found], dtype=np.float32).reshape(-1, 2, 2, 2),
        interocular=np.array([s["interocular"] for s in found], dtype=np.float32),
    )
