"""Speed of the coarse pipeline against dlib's face detection alone, on 640x480 one-face photos.

    python scripts/benchmark_speed.py --csv CSV --root DIR [--n 200] [--json OUT.json] \
        [--model-dir DIR [--version V]]

Each labelled face photo is scaled to 480 px high and centred on a 640x480 canvas (edges
replicated), encoded as JPEG, then timed in one interleaved run so machine noise hits both
sides alike: dlib's HOG detector alone (`detector(grey, 0)`), our face stage (detection ladder
+ landmarks), the whole coarse pipeline from decoded pixels, and the same with JPEG decoding.
The headline is the ratio of medians: pipeline / detection alone. With `--model-dir` the
regressor's whole pipeline (promoted version, or `--version`) is timed in the same loop, and
`regressor_added_ms_per_face` is its median extra time per face over the coarse pipeline.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import cv2
import dlib
import numpy as np
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.coarse import CoarseDetector  # noqa: E402
from backend.evaluation import read_truth_csv  # noqa: E402
from backend.images import load_image  # noqa: E402


def make_photo(path: Path) -> bytes:
    """A 640x480 JPEG with the face photo centred in it."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    scale = 480 / rgb.shape[0]
    rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), 480), interpolation=cv2.INTER_AREA)
    rgb = rgb[:, :640]
    pad = 640 - rgb.shape[1]
    rgb = cv2.copyMakeBorder(rgb, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_REPLICATE)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def best_of(fn, repeats: int) -> float:
    """Fastest of `repeats` calls, in ms (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model-dir", type=Path, help="also time this store's regressor")
    parser.add_argument("--version", help="regressor version (default: the promoted one)")
    args = parser.parse_args(argv)
    fine = None
    if args.model_dir is not None:
        from backend.model_store import ModelStore, ModelStoreError
        from backend.regressor.detector import RegressorDetector
        from backend.regressor.version import load_version

        try:
            version = ModelStore(args.model_dir).chosen(args.version)
        except ModelStoreError as exc:
            parser.error(str(exc))
        fine = RegressorDetector(load_version(version), coarse=CoarseDetector())

    rows = read_truth_csv(args.csv)
    rng = np.random.default_rng(args.seed)
    picked = [rows[i] for i in rng.permutation(len(rows))[: args.n]]
    hog = dlib.get_frontal_face_detector()
    coarse = CoarseDetector()
    timings: dict[str, list[float]] = {
        "detect_only": [],
        "faces": [],
        "pipeline": [],
        "decode+pipeline": [],
        **({"regressor_pipeline": []} if fine else {}),
    }
    one_face = 0
    for row in tqdm(picked, desc="images"):
        jpeg = make_photo(args.root / row.file)
        grey = load_image(jpeg).grey
        found = coarse.detect(grey)  # warm caches; also checks it is a one-face image
        one_face += len(found) == 1
        timings["detect_only"].append(best_of(lambda g=grey: hog(g, 0), args.repeats))
        timings["faces"].append(best_of(lambda g=grey: coarse.faces.detect(g), args.repeats))
        timings["pipeline"].append(best_of(lambda g=grey: coarse.detect(g), args.repeats))
        timings["decode+pipeline"].append(
            best_of(lambda j=jpeg: coarse.detect(load_image(j).grey), args.repeats)
        )
        if fine is not None:
            fine.detect(grey)  # first call per batch size traces the graph
            timings["regressor_pipeline"].append(
                best_of(lambda g=grey: fine.detect(g), args.repeats)
            )
    medians = {k: float(np.median(v)) for k, v in timings.items()}
    report = {
        "images": len(picked),
        "one_face_images": one_face,
        "size": "640x480",
        "median_ms": medians,
        "ratio_pipeline_to_detection": medians["pipeline"] / medians["detect_only"],
        "ratio_decode_pipeline_to_detection": medians["decode+pipeline"] / medians["detect_only"],
        "per_image_ratio_median": float(
            np.median(np.array(timings["pipeline"]) / np.array(timings["detect_only"]))
        ),
    }
    if fine is not None:
        extra = np.array(timings["regressor_pipeline"]) - np.array(timings["pipeline"])
        report["regressor_version"] = fine.version.name
        report["regressor_added_ms_per_face"] = float(np.median(extra))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
