"""Curriculum ordering (data.curriculum_column): pure math, numpy only.

Competence-based pacing (Platanios et al. 2019): after t of the span's T samples, the easiest c(t) share of
rows is "available", c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2)), c0 = data.curriculum_start. The paper draws
batches from the available rows with replacement, which would train some rows twice in an epoch and others
never. Here every epoch still trains every row exactly once; only the order changes. Each row gets a sort key
and each lane's rows are sorted by it (data/lane_steps.py; a step takes the front of every lane, so the
global order is the lanes' sorts interleaved, an approximation of one global sort):

    key = max(available_at, u)

`available_at` is the point of the epoch (0..1) where the competence reaches the row's difficulty quantile
(1 when it does not within this epoch), and `u` a seeded random position drawn so that, in expectation, the
share of the epoch's rows with a key below k is exactly k. So a row's key is about where it lands in the epoch:
no row comes before the competence admits it, and among admitted rows the order is random. When the span is
longer than an epoch the competence cannot admit every row in time; the rows it has not admitted come at the
epoch's end, easiest first — the one place the pacing gives way to "every row once per epoch". Epochs that
start after the span are not sorted: they use data.shuffle as usual.
"""

from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 1024  # the difficulty quantile is read off a histogram of the column (sources.py)
GRID = 4097  # points at which the random positions' distribution is tabulated


def span_samples(fraction: float, epochs: int, train_rows: int) -> int:
    """Samples over which the competence grows from curriculum_start to 1."""
    return max(1, round(fraction * epochs * train_rows))


def curriculum_epochs(fraction: float, epochs: int, train_rows: int) -> list[int]:
    """Epochs whose order the curriculum sets: those that start inside the span."""
    span = span_samples(fraction, epochs, train_rows)
    return [epoch for epoch in range(epochs) if epoch * train_rows < span]


def competence(samples: np.ndarray | float, span: int, start: float) -> np.ndarray:
    """Share of rows (easiest first) available after `samples` samples of training."""
    t = np.clip(np.asarray(samples, dtype=np.float64) / span, 0.0, 1.0)
    return np.minimum(1.0, np.sqrt(t * (1 - start ** 2) + start ** 2))


def available_at(quantile: np.ndarray, span: int, start: float) -> np.ndarray:
    """Samples of training after which a row of this difficulty quantile is available (inverse of competence)."""
    q = np.asarray(quantile, dtype=np.float64)
    if start >= 1:
        return np.zeros_like(q)
    return np.where(q <= start, 0.0, span * (q ** 2 - start ** 2) / (1 - start ** 2))


def quantiles(difficulty: np.ndarray, edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each row's difficulty quantile (0: easiest) from the column's histogram: the share of rows in lower bins,
    so equal difficulties get equal quantiles and the easiest rows 0."""
    below = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))[:-1] / max(float(np.sum(counts)), 1.0)
    bins = np.clip(np.searchsorted(edges, np.asarray(difficulty, dtype=np.float64), side="right") - 1,
                   0, len(counts) - 1)
    return below[bins]


def sort_keys(quantile: np.ndarray, uniform: np.ndarray, *, epoch: int, train_rows: int, span: int,
              start: float) -> np.ndarray:
    """Sort keys for one epoch's rows (ascending = trained first); see the module docstring. `uniform`: a seeded
    value in [0, 1) per row and epoch. Rows the competence does not admit within the epoch get keys above 1,
    in order of difficulty."""
    epoch_start = epoch * train_rows
    admitted = np.maximum(0.0, (available_at(quantile, span, start) - epoch_start) / train_rows)
    # The admitted share at each point k of the epoch is F(k) = competence there. For P(key <= k) = k we need
    # P(u <= k) = H(k) = k / F(k), capped at 1 where the competence falls behind (spans longer than an epoch).
    grid = np.linspace(0.0, 1.0, GRID)
    share = competence(epoch_start + grid * train_rows, span, start)
    cdf = np.maximum.accumulate(np.minimum(1.0, grid / share))
    position = np.interp(uniform, cdf, grid)  # inverse of H: ties resolve to the first k
    return np.maximum(admitted, position)
