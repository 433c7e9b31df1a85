"""Small labelled face datasets for tests, made from the committed astronaut photo.

Each image is the astronaut warped by a random similarity (scale, roll, shift) with a random
gamma, and its true pupils are the astronaut's pupils moved by the same warp. A few dozen such
images are enough to run the whole training and evaluation path in seconds.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.png"
# Image-left pupil (the subject's right eye) first, as in the truth CSV.
PUPILS = np.array([[203.3, 101.1], [246.7, 103.5]])
SIZE = 320


def write_dataset(directory: Path, n: int, seed: int = 0) -> Path:
    """Write `n` warped astronauts and `eyes.csv` under `directory`; returns the CSV's path."""
    rng = np.random.default_rng(seed)
    rgb = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["file,left_x,left_y,right_x,right_y"]
    midpoint = PUPILS.mean(axis=0)
    for i in range(n):
        scale = rng.uniform(0.9, 1.25)
        angle = rng.uniform(-10.0, 10.0)
        target = np.array([SIZE / 2, SIZE * 0.4]) + rng.uniform(-15, 15, 2)
        m = cv2.getRotationMatrix2D(tuple(midpoint), angle, scale)
        m[:, 2] += target - midpoint
        image = cv2.warpAffine(rgb, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)  # fmt: skip
        gamma = rng.uniform(0.7, 1.4)
        image = (255.0 * (image / 255.0) ** gamma).astype(np.uint8)
        pupils = PUPILS @ m[:, :2].T + m[:, 2]
        name = f"face_{i:03d}.png"
        Image.fromarray(image).save(directory / name)
        (lx, ly), (rx, ry) = pupils
        lines.append(f"{name},{lx:.2f},{ly:.2f},{rx:.2f},{ry:.2f}")
    csv_path = directory / "eyes.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path
