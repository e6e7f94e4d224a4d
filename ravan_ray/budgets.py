"""Compute heterogeneity: budget levels, client mixes, and the rank a client of a level holds.

Raje et al. 2025 (arXiv 2506.05568), compute heterogeneity: client c has a budget N_c in {1/4, 1/2, 3/4, 1} x
N_max; a method that reads it trains less at a lower level (Ravan fewer heads: methods/ravan/budget.py;
HetLoRA and FlexLoRA a lower rank: :func:`rank_for_level`). The paper shows the bell and skewed mixes only as bar
heights, so the proportions below are this project's choice (over the levels 1/4, 1/2, 3/4, 1):

    homogeneous   every client at the top level (no compute heterogeneity)
    uniform       25% / 25% / 25% / 25%
    bell          10% / 40% / 40% / 10%   (most clients at the middle levels)
    skewed_left    5% / 15% / 25% / 55%   (most clients at the top level)
    skewed_right  55% / 25% / 15% /  5%   (most clients at the lowest level, long tail to the right)

Counts per level use largest-remainder rounding of proportion x num_clients (so a mix of 20 clients
is exactly 2/8/8/2 for bell), then the levels are assigned to clients by a seeded permutation.
"Round" is round-half-up (floor(x + 0.5)), not Python's banker's rounding, so 0.5 x 3 heads -> 2.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

NAMED_MIXES: dict[str, tuple[float, ...]] = {
    "uniform": (0.25, 0.25, 0.25, 0.25),
    "bell": (0.10, 0.40, 0.40, 0.10),
    "skewed_left": (0.05, 0.15, 0.25, 0.55),
    "skewed_right": (0.55, 0.25, 0.15, 0.05),
}
#: every named compute mix (``compute.distribution``), in the order reports show them
MIXES = ("homogeneous", *NAMED_MIXES)


def mix_proportions(distribution: Union[str, Sequence[float]], levels: Sequence[float]) -> np.ndarray:
    """Proportions of clients per level for a named mix or explicit proportions."""
    if isinstance(distribution, str):
        if distribution == "homogeneous":
            proportions = np.zeros(len(levels))
            proportions[int(np.argmax(levels))] = 1.0
            return proportions
        if distribution not in NAMED_MIXES:
            raise ValueError(
                f"compute.distribution: unknown mix '{distribution}' (allowed: {', '.join(MIXES)}, or a list of proportions)"
            )
        if distribution == "uniform":
            return np.full(len(levels), 1.0 / len(levels))
        if len(levels) != 4:
            raise ValueError(
                f"compute.distribution '{distribution}' is defined over 4 levels; compute.levels has {len(levels)} (give explicit proportions instead)"
            )
        return np.array(NAMED_MIXES[distribution])
    proportions = np.asarray(distribution, dtype=float)
    if len(proportions) != len(levels) or abs(proportions.sum() - 1) > 1e-6 or (proportions < 0).any():
        raise ValueError("compute.distribution proportions must be one non-negative number per level, summing to 1")
    return proportions


def client_levels(
    num_clients: int, distribution: Union[str, Sequence[float]], levels: Sequence[float], seed: int
) -> np.ndarray:
    """The budget level (fraction of N_max) of every client, deterministic in ``seed``."""
    proportions = mix_proportions(distribution, levels)
    exact = proportions * num_clients
    counts = np.floor(exact).astype(int)
    # Largest remainder: hand the clients lost to flooring to the levels with the biggest remainders.
    for index in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[index] += 1
    assigned = np.repeat(np.asarray(levels, dtype=float), counts)
    rng = np.random.default_rng([seed, 0xB0D6E7])
    return assigned[rng.permutation(num_clients)]


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def rank_for_level(level: float, max_rank: int) -> int:
    """HetLoRA / FlexLoRA client rank r_c = level x r_max, at least 1."""
    return max(1, min(max_rank, round_half_up(level * max_rank)))
