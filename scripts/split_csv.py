"""Split a labelled CSV into train and test CSVs, whole people at a time.

    python scripts/split_csv.py --csv eyes.csv --out-dir DIR [--test-fraction 0.2] [--seed 0]

Writes DIR/train.csv and DIR/test.csv with the input's header and rows (image paths are left
as they are, so both use the same --root). A person (LFW names; any other file is its own
group, backend.evaluation.person_of) never appears on both sides, and a row's side depends
only on its person and the seed, so the test set stays the same as the CSV grows.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import backend  # noqa: F401
except ImportError:  # run as `python scripts/split_csv.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.evaluation import group_split, person_of, read_truth_csv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be in (0, 1)")
    try:
        read_truth_csv(args.csv)  # refuse a malformed CSV before writing anything
        with args.csv.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            records = list(reader)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = np.array([person_of(r["file"].strip()) for r in records])
    test = group_split(groups, args.test_fraction, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, mask in (("train", ~test), ("test", test)):
        with (args.out_dir / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(r for r, keep in zip(records, mask, strict=True) if keep)
    summary = {
        "train_rows": int((~test).sum()),
        "test_rows": int(test.sum()),
        "train_people": len(set(groups[~test])),
        "test_people": len(set(groups[test])),
        "out_dir": str(args.out_dir),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
