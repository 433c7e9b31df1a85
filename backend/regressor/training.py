"""Fitting the regressor: augmented crops, an L1 loss on the soft-argmax point, cosine schedule.

Kept free of files and CLI: `scripts/train.py` reads data and writes versions; the training
loop (issue 5's worker) calls the same `fit` with annotations from Label Studio.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from backend.evaluation import THRESHOLDS
from backend.model_store import ModelStore, ModelVersion
from backend.regressor.augment import Augmentation, augment, centre_crops, window_origin
from backend.regressor.crops import MODEL_GEOMETRY
from backend.regressor.dataset import FaceSamples
from backend.regressor.inference import predict_crops
from backend.regressor.network import NetworkConfig, build_network, keras, tf
from backend.regressor.uncertainty import EyeCues, fit_calibration, ranking_report
from backend.regressor.version import write_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How one model version is trained; stored in its metadata."""

    labels: str = "truth"  # "truth" (people's points) or "coarse" (the detector's own)
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    augmentation: Augmentation = field(default_factory=Augmentation)


def set_seeds(seed: int) -> None:
    """Same seed, same data order, same initial weights, same kernels (deterministic ops)."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def eye_errors(predicted: np.ndarray, samples: FaceSamples) -> np.ndarray:
    """(N, 2) per-eye errors in interocular distances, from (N, 2, 2) predicted points."""
    pixels = np.linalg.norm(predicted - samples.truth, axis=-1) / samples.scale
    return pixels / samples.interocular[:, None]


def face_errors(predicted: np.ndarray, samples: FaceSamples) -> np.ndarray:
    """Jesorsky's e per face: its worse eye's error."""
    return eye_errors(predicted, samples).max(axis=1)


def fit(
    train: FaceSamples,
    val: FaceSamples | None,
    config: TrainConfig,
    progress: bool = True,
    weights: np.ndarray | None = None,
    initial: keras.Model | None = None,
) -> tuple[keras.Model, list[dict]]:
    """A trained network and one record per epoch (loss, and val e05/e10 when `val` is given).

    Each epoch re-draws the augmentation of every training crop (both eyes of every face).
    `weights` (one per face) scale each face's loss, so detector-labelled faces can count less
    than people's; `initial` is a network of the same config whose weights training starts
    from (the serving version, when the loop retrains).
    """
    if len(train) == 0:
        raise ValueError("no training faces")
    set_seeds(config.seed)
    rng = np.random.default_rng(config.seed)
    pixels = train.pixels.reshape(-1, *train.pixels.shape[2:])
    points = train.targets(config.labels).reshape(-1, 2)
    eye_weights = None if weights is None else np.repeat(np.asarray(weights, np.float32), 2)
    model = build_network(config.network)
    if initial is not None:
        model.set_weights(initial.get_weights())
    steps = math.ceil(len(pixels) / config.batch_size) * config.epochs
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss={"xy": keras.losses.MeanAbsoluteError()},
    )
    history: list[dict] = []
    bar = tqdm(
        range(config.epochs), desc=f"training ({config.labels} labels)", unit="epoch",
        file=sys.stderr, disable=not progress,
    )  # fmt: skip
    for epoch in bar:
        x, y = augment(pixels, points, rng, config.augmentation)
        result = model.fit(
            x[..., None], {"xy": y}, batch_size=config.batch_size, epochs=1, verbose=0,
            shuffle=True, sample_weight=eye_weights,
        )  # fmt: skip
        record = {"epoch": epoch + 1, "loss_px": float(result.history["loss"][0])}
        last = epoch + 1 == config.epochs
        if val is not None and len(val) and (last or (epoch + 1) % 5 == 0):
            errors = face_errors(predict_samples(model, val).xy, val)
            record["val_e05"] = float(np.mean(errors <= 0.05))
            record["val_e10"] = float(np.mean(errors <= 0.10))
        history.append(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k != "epoch"})
        log.info("epoch %s", " ".join(f"{k}={v:.4g}" for k, v in record.items()))
    return model, history


@dataclass(frozen=True)
class SamplePrediction:
    """Predicted points (N, 2, 2) in the samples' source frame, and per-eye uncertainty cues."""

    xy: np.ndarray
    spread: np.ndarray  # (N, 2) heatmap spread, model-input pixels
    tta: np.ndarray  # (N, 2) distance between the plain and the mirrored prediction


def predict_samples(
    model: keras.Model, samples: FaceSamples, label_offset: np.ndarray | None = None
) -> SamplePrediction:
    """The model's points for every face's two centred crops (mirror TTA, as at inference).

    `label_offset` (dx, dy in image pixels, see `label_offset`) is added to every point.
    """
    n = len(samples)
    flat = samples.pixels.reshape(-1, *samples.pixels.shape[2:])
    crops, _ = centre_crops(flat, np.zeros((len(flat), 2)))
    out = predict_crops(model, crops)
    xy = (out.xy + np.array(window_origin())).reshape(n, 2, 2)
    if label_offset is not None:
        xy = xy + samples.image_offset_to_crop(label_offset)
    return SamplePrediction(xy=xy, spread=out.spread.reshape(n, 2), tta=out.tta.reshape(n, 2))


LABEL_OFFSET_FACES = 4000  # enough for a median; bounds the extra pass over the training set


def label_offset(model: keras.Model, train: FaceSamples, labels: str) -> np.ndarray:
    """The labels' systematic offset from the model's points: median (dx, dy) image pixels.

    The network is mirror-symmetric by construction (one model for both eyes, mirror
    augmentation and mirror TTA), so it cannot learn an offset that is the same in IMAGE axes
    for both eyes, such as a labelling convention (MTFL's pupils sit ~1.1 px right of the
    symmetric centre in both eyes). Measured on the training faces after fitting and added at
    inference, it lets a version follow its annotators' convention.
    """
    if len(train) > LABEL_OFFSET_FACES:
        pick = np.random.default_rng(0).choice(len(train), LABEL_OFFSET_FACES, replace=False)
        train = train.subset(np.sort(pick))
    residual = train.crop_to_image_offset(train.targets(labels) - predict_samples(model, train).xy)
    return np.median(residual.reshape(-1, 2), axis=0)


def eye_cues(prediction: SamplePrediction, samples: FaceSamples) -> EyeCues:
    """The uncertainty cues of predicted faces, as the detector computes them at inference."""
    eye_width = MODEL_GEOMETRY.eye_width_px
    return EyeCues(
        spread=prediction.spread / eye_width,
        tta=prediction.tta / eye_width,
        coarse_disagreement=np.linalg.norm(prediction.xy - samples.coarse, axis=-1) / eye_width,
        coarse_confidence=samples.coarse_confidence,
        eye_width_px=eye_width / samples.scale,
    )


def error_rates(errors: np.ndarray, prefix: str) -> dict[str, float]:
    """{prefix_e05, prefix_e10, prefix_e25} of per-face errors."""
    return {f"{prefix}_{k}": float(np.mean(errors <= t)) for k, t in THRESHOLDS.items()}


def train_version(
    store: ModelStore,
    train: FaceSamples,
    val: FaceSamples,
    config: TrainConfig,
    source: Mapping[str, Any],
    progress: bool = True,
    weights: np.ndarray | None = None,
    initial: keras.Model | None = None,
    prefix: str = "v",
) -> tuple[ModelVersion, dict]:
    """Fit, measure the labels' offset on `train`, score and calibrate on `val`, write a version.

    Returns the version and its summary: sizes, val error rates (the coarse detector's on the
    same faces beside them), and how well each uncertainty cue ranks the val faces' errors.
    `weights` and `initial` go to `fit`; the label offset is measured on the faces of the
    highest weight (people's labels, when detector labels are mixed in).
    """
    started = time.perf_counter()
    model, history = fit(train, val, config, progress=progress, weights=weights, initial=initial)
    offset_faces = train if weights is None else train.subset(weights >= np.max(weights))
    offset = label_offset(model, offset_faces, config.labels)
    prediction = predict_samples(model, val, offset)
    errors = face_errors(prediction.xy, val)
    cues = eye_cues(prediction, val)
    calibration = fit_calibration(cues, eye_errors(prediction.xy, val))
    summary = {
        "labels": config.labels,
        "train_size": len(train),
        "val_size": len(val),
        "label_offset_px": [round(float(v), 3) for v in offset],
        **error_rates(errors, "val"),
        "val_mean_e": float(np.mean(errors)),
        **error_rates(face_errors(val.coarse, val), "coarse_val"),
        "uncertainty": ranking_report(cues, calibration, errors),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    metadata = {
        "metrics": {k: v for k, v in summary.items() if k.startswith(("val_", "coarse_val_"))},
        "uncertainty": summary["uncertainty"],
        "data": {**source, "labels": config.labels, "train_faces": len(train),
                 "val_faces": len(val)},
        "training": {**asdict(config), "network": config.network.to_json(), "history": history},
        "code_version": code_version(),
    }  # fmt: skip
    version = write_version(store, model, config.network, calibration, offset, metadata, prefix)
    return version, summary


def code_version() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit (with '+dirty' when modified)."""
    import importlib.metadata
    import subprocess

    try:
        package = importlib.metadata.version("pupil-backend")
    except importlib.metadata.PackageNotFoundError:
        package = None
    commit = None
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            cwd=root, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": package, "commit": commit}
