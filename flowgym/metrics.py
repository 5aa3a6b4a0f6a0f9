"""Distribution metrics shared by the prior-capability metrics of every model family (pure maths).

A family's own metrics (what a fine-tuned model should still be able to do: the digits
classifier's accuracy, a Frechet distance in a scorer's feature space, ...) live in its folder
(``flowgym/backends/<family>/metrics.py``) and reach the trainer through the backend hook
``FlowBackend.prior_capability_metrics``. They are never optimised by training; comparing them
before and after RL measures forgetting.

* ``gaussian_statistics(features)``: mean and unbiased covariance of ``(N, D)`` features;
* ``frechet_distance(mu1, cov1, mu2, cov2)``: the squared 2-Wasserstein distance between Gaussians.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["frechet_distance", "gaussian_statistics"]


# --------------------------------------------------------------------------- pure maths
def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``, squared.

    ``FD = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^{1/2} cov2 cov1^{1/2})^{1/2})``,
    computed in float64 with symmetric eigen-decompositions (the cross term via the symmetric
    form, which has the same trace as ``(cov1 cov2)^{1/2}``).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}"
        )
    root1 = _sqrt_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_cross = np.sqrt(np.clip(cross, 0.0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_cross)
    return max(value, 0.0)


def gaussian_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``features (N, D)``, float64; N >= 2."""
    x = np.asarray(features.detach().cpu().double() if isinstance(features, Tensor) else features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D); got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


