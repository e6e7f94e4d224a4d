"""Ravan's budget arithmetic (Raje et al. 2025, arXiv 2506.05568): the rank of each head under the shared
per-matrix budget N, the number of heads a client of a compute level trains, and the head count past which more
heads add no rank. Plain integers (the report reads it without a model)."""

from __future__ import annotations

import math

from ravan_ray.budgets import round_half_up


def rank_from_budget(budget: int, heads: int) -> int:
    """Per-head rank r = floor(sqrt(N / h)) for a per-matrix trainable budget N (h heads of r x r; the paper's
    Table 10 works it for d = 768)."""
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1 trainable parameter per matrix, got {budget}")
    # floor(sqrt(N / h)) == isqrt(N // h) for integers, without float rounding surprises.
    rank = math.isqrt(budget // heads)
    if rank < 1:
        raise ValueError(
            f"budget {budget} is too small for {heads} heads: each head needs at least 1 parameter "
            f"(rank 1 core); raise the budget to >= {heads} or use fewer heads"
        )
    return rank


def heads_for_level(level: float, heads: int) -> int:
    """K_c = max(1, round(level * h)): the heads a client at compute level N_c / N_max trains (Algorithm 1 under
    compute heterogeneity)."""
    return max(1, min(heads, round_half_up(level * heads)))


def full_rank_heads(budget: int, d: int) -> float:
    """The number of heads at which their total rank reaches d at a budget of N per matrix: h heads of rank
    sqrt(N / h) reach sqrt(N h) = d at h = d^2 / N; past it more heads add no rank, where the paper reports the
    accuracy gains stop."""
    return d * d / budget
