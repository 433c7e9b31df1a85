"""Batch selection for active learning: what each strategy picks, and the cheap embedding."""

from __future__ import annotations

import numpy as np
import pytest

from backend.active_learning import STRATEGIES, crop_embedding, diverse_batch, select_batch


def _three_clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30 tasks in 3 tight clusters; cluster 0 holds the 10 least sure."""
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cluster = np.repeat(np.arange(3), 10)
    embedding = centres[cluster] + rng.normal(0, 0.1, (30, 2))
    confidence = np.concatenate([
        np.linspace(0.01, 0.10, 10), np.linspace(0.20, 0.30, 10), np.linspace(0.40, 0.50, 10)
    ])  # fmt: skip
    return embedding, confidence, cluster


def test_uncertainty_takes_the_least_sure_in_order() -> None:
    confidence = np.array([0.9, 0.1, 0.5, 0.05, 0.7])
    picked = select_batch("uncertainty", confidence, 3, np.random.default_rng(0))
    assert picked.tolist() == [3, 1, 2]


def test_random_takes_k_distinct_tasks() -> None:
    picked = select_batch("random", np.zeros(50), 20, np.random.default_rng(0))
    assert len(set(picked.tolist())) == 20 and picked.max() < 50


def test_diverse_takes_the_least_sure_of_each_cluster() -> None:
    rng = np.random.default_rng(0)
    embedding, confidence, cluster = _three_clusters(rng)
    plain = select_batch("uncertainty", confidence, 3, rng)
    assert set(cluster[plain]) == {0}  # near-duplicates
    picked = select_batch("diverse", confidence, 3, rng, embedding, prefilter=10)
    assert sorted(cluster[picked]) == [0, 1, 2]
    for c in range(3):  # and within each cluster, its least sure task
        members = np.flatnonzero(cluster == c)
        assert members[np.argmin(confidence[members])] in picked
    assert np.all(np.diff(confidence[picked]) >= 0)  # most urgent first


def test_diverse_with_a_small_pool_is_plain_uncertainty() -> None:
    confidence = np.array([0.3, 0.1, 0.2])
    picked = diverse_batch(confidence, np.eye(3), 5, np.random.default_rng(0))
    assert picked.tolist() == [1, 2, 0]


def test_unknown_strategy_and_missing_embedding_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        select_batch("greedy", np.zeros(3), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="embedding"):
        select_batch("diverse", np.zeros(3), 1, np.random.default_rng(0))
    assert set(STRATEGIES) == {"random", "uncertainty", "diverse"}


def test_embedding_puts_near_duplicates_together() -> None:
    rng = np.random.default_rng(1)
    people = rng.integers(0, 255, (5, 2, 40, 64)).astype(np.float32)
    faces = np.repeat(people, 4, axis=0) + rng.normal(0, 4, (20, 2, 40, 64))
    pixels = np.clip(faces, 0, 255).astype(np.uint8)
    embedding = crop_embedding(pixels, dims=8)
    assert embedding.shape == (20, 8) and embedding.dtype == np.float32
    distance = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    same = np.repeat(np.arange(5), 4)
    within = distance[same[:, None] == same[None]].max()
    between = distance[same[:, None] != same[None]].min()
    assert within < between


def test_embedding_of_one_face_is_defined() -> None:
    assert crop_embedding(np.zeros((1, 2, 40, 64), np.uint8), dims=4).shape == (1, 4)
