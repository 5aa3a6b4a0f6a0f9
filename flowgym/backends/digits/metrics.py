"""Prior-capability metrics of the digits family: what a fine-tuned model should still be able to do.

* ``digit_accuracy(images, prompts)``: fraction of images the shipped classifier assigns to the
  prompt's digit (argmax).
* ``digit_fd(images, prompts)``: Frechet distance between Gaussian fits of the classifier's
  penultimate features of the images and of the real held-out ``eval`` digits (the class mix of
  the reference follows the prompts). Lower is better; compare with
  ``digit_fd(real_images, prompts)`` at the same sample size, since FD is biased upward for
  small samples.

``DigitsBackend.prior_capability_metrics`` reports both at every evaluation.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flowgym.backends.digits.core import (
    NUM_DIGITS,
    DigitClassifier,
    digit_split,
    load_classifier,
    prompt_digits,
    to_digit_grid,
)
from flowgym.metrics import frechet_distance, gaussian_statistics

__all__ = ["digit_accuracy", "digit_fd", "digit_feature_statistics", "digits_prior_capability"]


@lru_cache(maxsize=1)
def _shipped_classifier() -> DigitClassifier:
    return load_classifier()


def _classifier(classifier: nn.Module | None, device: torch.device) -> nn.Module:
    model = _shipped_classifier() if classifier is None else classifier
    return model.to(device)


@torch.no_grad()
def _features(classifier: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    grid = to_digit_grid(images.to(next(classifier.parameters()).device))
    return torch.cat([classifier.features(grid[i : i + batch_size]).float() for i in range(0, len(grid), batch_size)])


@torch.no_grad()
def digit_accuracy(images: Tensor, prompts: Sequence[str], classifier: nn.Module | None = None) -> float:
    """Fraction of ``images`` whose classifier argmax equals the digit named by their prompt."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    model = _classifier(classifier, images.device)
    labels = prompt_digits(prompts).to(images.device)
    predicted = model(to_digit_grid(images)).argmax(dim=-1)
    return float((predicted == labels).float().mean().cpu())


def _class_moments(classifier: nn.Module, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class feature means ``(10, D)``, second moments ``(10, D, D)`` and counts of the eval split."""
    images, labels = digit_split("eval")
    feats = _features(classifier, images.to(device)).double().cpu().numpy()
    labels = labels.numpy()
    means, seconds, counts = [], [], []
    for digit in range(NUM_DIGITS):
        f = feats[labels == digit]
        means.append(f.mean(axis=0))
        seconds.append(f.T @ f / len(f))
        counts.append(len(f))
    return np.stack(means), np.stack(seconds), np.asarray(counts, np.float64)


@lru_cache(maxsize=1)
def _shipped_class_moments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _class_moments(_shipped_classifier(), torch.device("cpu"))


def digit_feature_statistics(
    class_weights: Sequence[float] | None = None, classifier: nn.Module | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of the real ``eval`` digits' classifier features, as a class mixture.

    With weights ``w_c`` (normalised) and per-class feature mean ``m_c`` and second moment
    ``S_c``: ``mu = sum_c w_c m_c`` and ``cov = sum_c w_c S_c - mu mu^T``. ``None`` uses the
    split's own class proportions.
    """
    if classifier is None:
        means, seconds, counts = _shipped_class_moments()
    else:
        means, seconds, counts = _class_moments(classifier, next(classifier.parameters()).device)
    w = counts if class_weights is None else np.asarray(class_weights, np.float64)
    if w.shape != (NUM_DIGITS,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class_weights must be 10 non-negative numbers with a positive sum; got {w}")
    w = w / w.sum()
    mu = np.einsum("c,cd->d", w, means)
    cov = np.einsum("c,cde->de", w, seconds) - np.outer(mu, mu)
    return mu, cov


def digit_fd(
    images: Tensor,
    prompts: Sequence[str] | None = None,
    reference: str | Tensor = "real",
    classifier: nn.Module | None = None,
) -> float:
    """Frechet distance of ``images``' classifier features to a reference (lower is better).

    ``reference="real"``: the held-out real ``eval`` digits, mixed in the class proportions of
    ``prompts`` (all classes as in the split when ``prompts`` is None). A tensor of images uses
    those images' statistics instead. The images' own statistics need at least 2 images; FD is
    biased upward for small samples, so compare values at equal sample sizes.
    """
    model = _classifier(classifier, images.device)
    mu, cov = gaussian_statistics(_features(model, images))
    if isinstance(reference, Tensor):
        ref_mu, ref_cov = gaussian_statistics(_features(model, reference.to(images.device)))
    elif reference == "real":
        weights = None
        if prompts is not None:
            if len(prompts) != images.shape[0]:
                raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
            weights = np.bincount(prompt_digits(prompts).numpy(), minlength=NUM_DIGITS).astype(np.float64)
        ref_mu, ref_cov = digit_feature_statistics(weights, classifier)
    else:
        raise ValueError(f"reference must be 'real' or a tensor of images; got {reference!r}")
    return frechet_distance(mu, cov, ref_mu, ref_cov)




def digits_prior_capability(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """``{"digit_accuracy", "digit_fd"}`` of decoded ``images`` for ``prompts`` (FD is NaN below 2 images)."""
    return {
        "digit_accuracy": digit_accuracy(images, prompts),
        "digit_fd": digit_fd(images, prompts) if images.shape[0] >= 2 else float("nan"),
    }
