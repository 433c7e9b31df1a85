"""The coarse detector: faces -> landmarks -> eye crops -> pupils, with no training data."""

from backend.coarse.detector import DEFAULT_VARIANT, VARIANTS, CoarseDetector

__all__ = ["DEFAULT_VARIANT", "VARIANTS", "CoarseDetector"]
