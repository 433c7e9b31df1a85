"""Logistic calibration: turning uncertainty cues into P(point is right).

Both detectors report a confidence that is a probability: that a pupil lies within 0.05
interocular distances of the truth. They learn it the same way, by a maximum-likelihood
logistic regression from their own cues to that event on faces with known truth.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Coefficients of P(y=1 | x) = sigmoid(x @ w); x's first column is the intercept (1s).

    A small ridge (not on the intercept) keeps the fit finite when the classes separate.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        nll = np.logaddexp(0.0, z) - y * z
        reg = l2 * np.sum(w[1:] ** 2)
        grad = x.T @ (sigmoid(z) - y) / len(y) + 2 * l2 * np.r_[0.0, w[1:]]
        return float(nll.mean() + reg), grad

    return minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))
