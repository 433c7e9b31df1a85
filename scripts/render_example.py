"""Draw what the coarse detector pre-annotates on an image (the README's picture).

    python scripts/render_example.py IMAGE OUT.png [--variant fused]

Pupils are drawn as crosses, eye corners as dots, each with its confidence; the face box
carries the face confidence (the number that ranks tasks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.coarse import DEFAULT_VARIANT, VARIANTS, CoarseDetector  # noqa: E402
from backend.images import load_image  # noqa: E402
from backend.keypoints import KEYPOINT_NAMES  # noqa: E402

COLOURS = {  # BGR
    "left_pupil": (0, 255, 0),
    "right_pupil": (0, 255, 255),
    "left_eye_outer": (255, 128, 0),
    "left_eye_inner": (255, 0, 255),
    "right_eye_inner": (0, 128, 255),
    "right_eye_outer": (255, 255, 0),
}


def render(image_path: Path, variant: str, zoom_to_face: bool = True) -> np.ndarray:
    """BGR picture of the image with the detector's keypoints drawn on it."""
    image = load_image(image_path)
    faces = CoarseDetector(variant).detect(image.grey)
    canvas = cv2.cvtColor(np.ascontiguousarray(image.rgb), cv2.COLOR_RGB2BGR)
    scale = 1.0
    if zoom_to_face and len(faces) == 1:
        x0, y0, x1, y1 = faces[0].box
        side = (x1 - x0) * 1.6
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(np.clip(cx - side / 2, 0, canvas.shape[1] - 1))
        top = int(np.clip(cy - side / 2, 0, canvas.shape[0] - 1))
        canvas = canvas[top : top + int(side), left : left + int(side)]
        scale = 600 / canvas.shape[1]
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        offset = np.array([left, top])
    else:
        offset = np.zeros(2)
    for face in faces:
        box = ((face.box.reshape(2, 2) - offset) * scale).astype(int)
        cv2.rectangle(canvas, tuple(box[0]), tuple(box[1]), (255, 255, 255), 1)
        cv2.putText(
            canvas,
            f"face {face.confidence:.2f}",
            (box[0][0], box[0][1] - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        for name, point in zip(KEYPOINT_NAMES, face.points, strict=True):
            p = tuple(((point - offset) * scale).round().astype(int))
            if name.endswith("pupil"):
                cv2.drawMarker(canvas, p, COLOURS[name], cv2.MARKER_CROSS, 18, 2, cv2.LINE_AA)
            else:
                cv2.circle(canvas, p, 4, COLOURS[name], -1, cv2.LINE_AA)
    if len(faces) == 1:  # legend: name and confidence of each point
        for i, (name, conf) in enumerate(zip(KEYPOINT_NAMES, faces[0].confidences, strict=True)):
            y = canvas.shape[0] - 12 - 20 * (len(KEYPOINT_NAMES) - 1 - i)
            cv2.rectangle(canvas, (6, y - 15), (230, y + 5), (0, 0, 0), -1)
            cv2.circle(canvas, (16, y - 5), 5, COLOURS[name], -1, cv2.LINE_AA)
            cv2.putText(
                canvas,
                f"{name}  {conf:.2f}",
                (28, y),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.45,
                (255, 255, 255),
                1,
                cv2.LINE_AA,
            )
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), render(args.image, args.variant))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
