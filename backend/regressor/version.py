"""A trained regressor on disk: one model-store version directory.

    versions/<name>/
        weights.h5        the network's weights (tf-keras HDF5)
        backbone/         a copy of the TF-Hub module, when one was used (offline reloads)
        metadata.json     kind, network config, preprocessing, calibration, metrics, data, code

The network is rebuilt from its config by `build_network` and the weights loaded into it, so a
version needs this package (matching `code_version`) but no pickled Python. Writing goes
through `ModelStore.create`: the directory appears complete or not at all.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.model_store import ModelStore, ModelStoreError, ModelVersion
from backend.regressor.crops import MODEL_GEOMETRY, SOURCE_GEOMETRY
from backend.regressor.network import COMPACT, NetworkConfig, build_network, keras
from backend.regressor.uncertainty import coefficients_from_json, coefficients_json

KIND = "pupil-regressor"
WEIGHTS = "weights.h5"
BACKBONE = "backbone"


@dataclass(frozen=True)
class RegressorVersion:
    """A loaded version: the network with its weights, and its calibration."""

    name: str
    path: Path
    model: keras.Model
    network: NetworkConfig
    calibration: np.ndarray
    label_offset: np.ndarray  # (dx, dy) image pixels added to every pupil
    metadata: Mapping[str, Any]


def preprocessing() -> dict:
    """How crops are made; recorded so a version can be checked against the running code."""
    return {
        "model_crop": asdict(MODEL_GEOMETRY),
        "source_crop": asdict(SOURCE_GEOMETRY),
        "mirrored_eye": "left_pupil (the subject's left eye, on the image's right)",
        "pixels": "grey 0-255, standardised per crop inside the network",
        "tta": "mirror",
    }


def write_version(
    store: ModelStore,
    model: keras.Model,
    network: NetworkConfig,
    calibration: np.ndarray,
    label_offset: np.ndarray,
    metadata: Mapping[str, Any],
    prefix: str = "v",
) -> ModelVersion:
    """Save a trained network as a new version (atomically) named `prefix`<time>; returns it."""

    def write(directory: Path) -> None:
        model.save_weights(directory / WEIGHTS)
        if network.backbone != COMPACT:
            import tensorflow_hub as hub

            shutil.copytree(hub.resolve(network.backbone), directory / BACKBONE)

    full = {
        **metadata,
        "kind": KIND,
        "network": network.to_json(),
        "preprocessing": preprocessing(),
        "calibration": coefficients_json(calibration),
        "label_offset_px": [float(v) for v in label_offset],
    }
    return store.create(write, full, prefix)


def load_version(version: ModelVersion) -> RegressorVersion:
    """Rebuild and load a version; ModelStoreError saying why when it cannot be used."""
    meta = version.metadata
    if meta.get("kind") != KIND:
        raise ModelStoreError(f"model version {version.name!r} is not a {KIND}")
    try:
        network = NetworkConfig.from_json(meta["network"])
        calibration = coefficients_from_json(meta["calibration"])
        offset = np.array(meta.get("label_offset_px", [0.0, 0.0]), dtype=np.float64)
        if offset.shape != (2,) or not np.all(np.isfinite(offset)):
            raise ValueError(f"label_offset_px must be two finite numbers, not {offset}")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelStoreError(f"model version {version.name!r}: bad metadata: {e}") from None
    if network.backbone != COMPACT:
        local = version.path / BACKBONE
        if not local.is_dir():
            raise ModelStoreError(f"model version {version.name!r} lacks its {BACKBONE}/ copy")
        network = NetworkConfig.from_json({**network.to_json(), "backbone": str(local)})
    model = build_network(network)
    try:
        model.load_weights(version.path / WEIGHTS)
    except (OSError, ValueError) as e:
        raise ModelStoreError(f"model version {version.name!r}: weights unusable: {e}") from None
    return RegressorVersion(
        name=version.name,
        path=version.path,
        model=model,
        network=network,
        calibration=calibration,
        label_offset=offset,
        metadata=meta,
    )
