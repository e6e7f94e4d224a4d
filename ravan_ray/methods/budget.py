"""Budget matching: every parameter-efficient method trains the same number N of parameters per matrix.

N is ``method.budget`` when given, else the size of a rank-r_L LoRA, N = r_L (d_in + d_out) (the budget Raje et
al. 2025, arXiv 2506.05568, match their baselines at: LoRA of rank r_L has 2 r_L d parameters on a d x d matrix).
Each method turns N into the rank of its own factors by its own rule, declared in its own file (its class's
``rank_rule``, or its ``rank`` for a rule that needs its options), so that what one client trains in one adapted
d_out x d_in matrix is (at most) N numbers. The rules here are the ones several methods share:

    LORA_RANK   r = floor(N / (d_in + d_out))   B and A train (FedIT, FedEx-LoRA, FLoRA, FedSA-LoRA, RoLoRA;
                                                HetLoRA, FlexLoRA and Fed-PLoRA as r_max, clients r_c <= r_max)
    B_ONLY      r = floor(N / d_out)            only B trains (FFA-LoRA, FedSVD: 2 r_L when d_in = d_out)
    CORE        r = floor(sqrt(N))              only the r x r core trains (Fed-SB)

Ravan's heads take r = floor(sqrt(N / h)) each (methods/ravan/budget.py); full fine-tuning has no budget (the
update is full rank, min(d_in, d_out)).

No method's rank may exceed min(d_in, d_out): the update is full rank there, and more rank only costs
memory (SVD-based methods, fed_sb, flexlora and fedsvd, cannot even have more singular directions). A
budget that asks for more is refused with the largest one that makes sense (:meth:`RankRule.rank_for`).
FedSA-LoRA trains B as well, only keeps it local, so it gets the LoRA rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ravan_ray.adapters import budget_from_lora_rank
from ravan_ray.methods import method_class


def per_matrix_budget(method_config, d_in: int, d_out: int) -> int:
    """N for one weight matrix: ``method.budget`` if given, else the budget of LoRA rank r_L, r_L (d_in + d_out)."""
    if method_config.budget is not None:
        return int(method_config.budget)
    return budget_from_lora_rank(method_config.lora_rank, d_in, d_out)


def given_budget(method_config) -> str:
    """The key that set the budget, as the user typed it (for messages)."""
    return (f"method.budget={method_config.budget}" if method_config.budget is not None
            else f"method.lora_rank={method_config.lora_rank}")


@dataclass(frozen=True)
class RankRule:
    """How a method's factors turn a budget N of one d_out x d_in matrix into a rank, and a rank back into the
    budget it takes."""

    rank: Callable[[int, int, int], int]  # (N, d_in, d_out) -> r
    budget: Callable[[int, int, int], int]  # (r, d_in, d_out) -> N

    def rank_for(self, method_config, d_in: int, d_out: int) -> int:
        """The rank under ``method_config``'s budget, refused (one line naming the key to change) where it is 0 or
        above min(d_in, d_out), where the update is already full rank."""
        name = method_config.name
        budget = per_matrix_budget(method_config, d_in, d_out)
        rank = self.rank(budget, d_in, d_out)
        if rank < 1:
            raise ValueError(
                f"method.budget {budget} is too small for {name} on a {d_out} x {d_in} matrix (rank would be 0); "
                f"raise method.budget or method.lora_rank"
            )
        d = min(d_in, d_out)
        if rank > d:
            largest = self.budget(d, d_in, d_out)
            raise ValueError(
                f"{given_budget(method_config)} (N = {budget} per matrix) gives {name} rank {rank} on a {d_out} x "
                f"{d_in} matrix, more than {d}, where the update is already full rank: use method.budget <= {largest} "
                f"(method.lora_rank <= {largest // (d_in + d_out)})")
        return rank


LORA_RANK = RankRule(rank=lambda n, d_in, d_out: n // (d_in + d_out), budget=lambda r, d_in, d_out: r * (d_in + d_out))
B_ONLY = RankRule(rank=lambda n, d_in, d_out: n // d_out, budget=lambda r, d_in, d_out: r * d_out)
CORE = RankRule(rank=lambda n, d_in, d_out: math.isqrt(n), budget=lambda r, d_in, d_out: r * r)


def method_rank(method_config, d_in: int, d_out: int) -> int:
    """The rank the method ``method_config.name`` uses on a d_out x d_in matrix under the shared budget N (per head
    for ravan, r_max for the heterogeneous-rank methods): its own rule (:meth:`FederatedMethod.rank`)."""
    return method_class(method_config.name).rank(method_config, d_in, d_out)


def layer_summary(method_config, shapes: dict[str, tuple[int, int]], budgeted: bool = True) -> dict[str, Any]:
    """What every method records under ``resolved.method`` besides its ranks: the adapted layers' shapes
    [d_out, d_in] and, for a parameter-efficient method (``budgeted``), the budget N of each."""
    summary: dict[str, Any] = {"layer_shapes": {name: [int(d_out), int(d_in)] for name, (d_out, d_in) in shapes.items()}}
    if budgeted:
        summary["budget_per_matrix"] = {name: per_matrix_budget(method_config, d_in, d_out)
                                        for name, (d_out, d_in) in shapes.items()}
    return summary
