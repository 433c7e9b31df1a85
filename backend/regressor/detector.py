"""The fine detector: the coarse pipeline's faces and landmarks, the regressor's pupils.

image -> faces + 68 landmarks (dlib, as in the coarse detector) -> both eye crops of every
face in one batch -> the network, with its mirror images -> pupils mapped back to the image,
each with a calibrated confidence. Eye corners stay the landmarks' (MTFL has no corner labels
to learn them from).
"""

from __future__ import annotations

import numpy as np

from backend.coarse.detector import CoarseDetector
from backend.keypoints import FaceKeypoints
from backend.regressor.crops import MODEL_GEOMETRY, face_crops
from backend.regressor.inference import forward, predict_crops
from backend.regressor.uncertainty import EyeCues, eye_confidence
from backend.regressor.version import RegressorVersion


class RegressorDetector:
    """Finds every face and refines its pupils with a trained model version."""

    def __init__(self, version: RegressorVersion, coarse: CoarseDetector | None = None) -> None:
        self.version = version
        self.coarse = coarse or CoarseDetector()
        self._call = forward(version.model)
        self.method = f"regressor/{version.name}"

    def detect(self, grey: np.ndarray) -> list[FaceKeypoints]:
        """Keypoints for every face in a grey uint8 image (EXIF already applied)."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        faces = self.coarse.faces.detect(grey)
        if not faces:
            return []
        coarse = [self.coarse.keypoints_for(grey, face)[0] for face in faces]
        crops = [face_crops(grey, face.landmarks, MODEL_GEOMETRY) for face in faces]
        out = predict_crops(
            self.version.model, np.concatenate([c.pixels for c in crops]), self._call
        )
        eye_width = MODEL_GEOMETRY.eye_width_px
        results = []
        for i, (face, kp, fc) in enumerate(zip(faces, coarse, crops, strict=True)):
            rows = slice(2 * i, 2 * i + 2)
            offset = self.version.label_offset
            xy = out.xy[rows] + [np.linalg.solve(fc.linear_to_image(r), offset) for r in (0, 1)]
            coarse_xy = np.stack([fc.from_image(r, kp.points[r])[0] for r in (0, 1)])
            cues = EyeCues(
                spread=out.spread[rows] / eye_width,
                tta=out.tta[rows] / eye_width,
                coarse_disagreement=np.linalg.norm(xy - coarse_xy, axis=1) / eye_width,
                coarse_confidence=kp.confidences[:2],
                eye_width_px=np.array([eye_width / c.scale for c in fc.crops]),
            )
            confidences = kp.confidences.copy()
            confidences[:2] = eye_confidence(cues, self.version.calibration)
            points = kp.points.copy()
            points[0] = fc.to_image(0, xy[0])[0]
            points[1] = fc.to_image(1, xy[1])[0]
            results.append(
                FaceKeypoints(
                    box=face.box,
                    points=points,
                    confidences=confidences,
                    confidence=float(confidences[0] * confidences[1]),
                    method=self.method,
                )
            )
        return results
