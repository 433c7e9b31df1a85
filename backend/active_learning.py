"""Which tasks people should label next: the least sure first, and not all alike.

A task's score (backend/results.py) is the model's confidence that every pupil in it is within
0.05 interocular distances, so "least sure first" is ascending score. Ranked alone, the top of
that list tends to be one kind of hard photo many times over (the same person, the same light,
the same sunglasses): labelling ten of them teaches little more than labelling one. The
`diverse` strategy follows Zhdanov's "Diverse mini-batch active learning" (2019): take the
`prefilter` x k least sure candidates, cluster them into k groups on a cheap appearance
embedding (k-means), and label the least sure task of each group.

The embedding is the face's two canonical eye crops (already cut for the regressor), shrunk to
a few hundred pixels and projected on their principal components: it captures who, which
light and which pose, costs nothing extra, and needs no network.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2

STRATEGIES: tuple[str, ...] = ("random", "uncertainty", "diverse")
EMBEDDING_SHRINK = 4  # eye crops are block-averaged by this factor per side
EMBEDDING_DIMS = 32
PREFILTER = 10  # diverse: candidates per slot in the batch


def crop_embedding(pixels: np.ndarray, dims: int = EMBEDDING_DIMS) -> np.ndarray:
    """(N, dims) embedding of (N, 2, H, W) uint8 eye crops (both eyes of a face).

    Block means of each crop, standardised per pixel, then the first `dims` principal
    components of the set (so the embedding is relative to the faces being ranked together).
    """
    n, eyes, h, w = pixels.shape
    f = EMBEDDING_SHRINK
    small = pixels[:, :, : h - h % f, : w - w % f].astype(np.float32)
    small = small.reshape(n, eyes, h // f, f, w // f, f).mean(axis=(3, 5)).reshape(n, -1)
    small -= small.mean(axis=0)
    small /= small.std(axis=0) + 1e-6
    if n < 2:
        return np.zeros((n, dims), np.float32)
    _, s, vt = np.linalg.svd(small[: min(n, 5000)], full_matrices=False)
    components = vt[: min(dims, len(s))]
    out = np.zeros((n, dims), np.float32)
    out[:, : len(components)] = small @ components.T
    return out


def select_batch(
    strategy: str,
    confidence: np.ndarray,
    k: int,
    rng: np.random.Generator,
    embedding: np.ndarray | None = None,
    prefilter: int = PREFILTER,
) -> np.ndarray:
    """Indices of the k candidates (rows of `confidence`) to label next, most urgent first."""
    n = len(confidence)
    k = min(k, n)
    if strategy == "random":
        return rng.choice(n, size=k, replace=False)
    order = np.argsort(confidence, kind="stable")
    if strategy == "uncertainty":
        return order[:k]
    if strategy == "diverse":
        if embedding is None:
            raise ValueError("the diverse strategy needs an embedding")
        return diverse_batch(confidence, embedding, k, rng, prefilter)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def diverse_batch(
    confidence: np.ndarray,
    embedding: np.ndarray,
    k: int,
    rng: np.random.Generator,
    prefilter: int = PREFILTER,
) -> np.ndarray:
    """k least-sure candidates from k different k-means clusters of the prefiltered pool."""
    order = np.argsort(confidence, kind="stable")
    pool = order[: min(len(order), max(k, prefilter * k))]
    if len(pool) <= k:
        return pool
    seed = int(rng.integers(2**31))
    _, cluster = kmeans2(embedding[pool].astype(np.float64), k, minit="++", seed=seed)
    picked = []
    for c in np.unique(cluster):
        members = pool[cluster == c]
        picked.append(members[np.argmin(confidence[members])])
    picked = np.array(picked)
    if len(picked) < k:  # empty clusters: fill with the least sure of the rest
        rest = pool[~np.isin(pool, picked)]
        picked = np.concatenate([picked, rest[: k - len(picked)]])
    return picked[np.argsort(confidence[picked], kind="stable")]
