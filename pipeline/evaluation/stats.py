"""Is a gain real? Intervals over images, paired comparisons and the leaderboard's shake-up.

The unit of sampling is the image (pixels of one photo are not independent): a bootstrap draws N
images with replacement, sums (or averages) their per-image confusions and recomputes the metric.
Two experiments compared on the same images use the *same* draws (a paired bootstrap): the shared
difficulty of each image cancels, so the interval of the difference is far narrower than either
interval alone. All draws are seeded: the same inputs give the same interval on every machine.

The shake-up: a competition scores ~410 test images on the public leaderboard and another ~410 on
the private one. Drawing two such halves from the out-of-fold images, many times, shows how far the
two scores of one fixed model fall apart by chance alone.
"""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.metrics import Metric

DRAWS = 1000


def _draws(n: int, draws: int, seed: int, size: int | None = None) -> np.ndarray:
    """(draws, n) counts: how often each of n images is in each resample of `size` (default n) images."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, (draws, size or n))
    return np.stack([np.bincount(p, minlength=n) for p in picks])


def interval(metric: Metric, per_image: np.ndarray, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval (2.5th, 97.5th percentile) of the metric over images."""
    if len(per_image) < 2:
        v = metric.value(per_image) if len(per_image) else float("nan")
        return v, v
    boot = metric.values(_draws(len(per_image), draws, seed), per_image)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def paired(metric: Metric, a: np.ndarray, b: np.ndarray, draws: int = DRAWS, seed: int = 0) -> dict:
    """a minus b on the same images (row i of both is image i): the difference and its 95 % interval."""
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.shape} vs {b.shape}")
    diff = metric.value(a) - metric.value(b)
    if len(a) < 2:
        return {"diff": diff, "low": diff, "high": diff}
    counts = _draws(len(a), draws, seed)
    boot = metric.values(counts, a) - metric.values(counts, b)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(diff), "low": float(lo), "high": float(hi)}


def shakeup(metric: Metric, per_image: np.ndarray, half: int = 410, draws: int = DRAWS, seed: int = 0) -> dict:
    """public minus private score of one model when each leaderboard scores `half` images drawn from
    these: {'half', 'sd', 'p95_abs'} (p95_abs: 95 % of the time the two differ by less than this)."""
    n = len(per_image)
    if n < 2:
        return {"half": half, "sd": 0.0, "p95_abs": 0.0}
    both = _draws(n, draws, seed, 2 * half)   # counts of a sample of 2 x half images...
    rng = np.random.default_rng(seed + 1)
    public = np.stack([np.bincount(rng.choice(np.repeat(np.arange(n), c), half, replace=False), minlength=n)
                       for c in both])          # ...split at random into the public and the private half
    diff = metric.values(public, per_image) - metric.values(both - public, per_image)
    return {"half": half, "sd": float(diff.std()), "p95_abs": float(np.percentile(np.abs(diff), 95))}


def fmt_interval(lo: float, hi: float) -> str:
    return f"[{lo:.4f}, {hi:.4f}]"


def fmt_paired(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
