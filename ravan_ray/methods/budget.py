"""Budget matching: every parameter-efficient method trains the same number N of parameters per matrix.

N is ``method.budget`` when given, else the size of a rank-r_L LoRA, N = r_L (d_in + d_out)
(PAPER.md section 1). Each method turns N into the rank of its own factors, so that what one client
trains in one adapted d_out x d_in matrix is (at most) N numbers:

    fedit, fedex_lora, flora, fedsa_lora,  r = floor(N / (d_in + d_out))       (B and A train: r_L; RoLoRA
    rolora                                                                      trains one of them a round)
    hetlora, flexlora, fed_plora           r_max = floor(N / (d_in + d_out))   (clients: r_c <= r_max)
    ffa_lora, fedsvd                       r = floor(N / d_out)                (only B trains: 2 r_L when
                                                                                d_in = d_out; FedSVD's A is
                                                                                set by the server's SVD)
    fed_sb                                 r = floor(sqrt(N))                  (only the r x r core trains)
    ravan                                  r = floor(sqrt(N / h)) per head     (h cores of r x r)
    full_ft                                no budget: the update is full rank, min(d_in, d_out)

SVD-based methods (fed_sb, flexlora, fedsvd) cannot have more singular directions than min(d_in, d_out), so
their rank is capped there. FedSA-LoRA trains B as well, only keeps it local, so it gets the LoRA rank.
"""

from __future__ import annotations

import math
from typing import Any

from ravan_ray.adapters import budget_from_lora_rank, rank_from_budget

LORA_RANK_METHODS = ("fedit", "fedex_lora", "flora", "fedsa_lora", "hetlora", "flexlora", "rolora", "fed_plora")
B_ONLY_METHODS = ("ffa_lora", "fedsvd")
SVD_METHODS = ("fed_sb", "flexlora", "fedsvd")


def per_matrix_budget(method_config, d_in: int, d_out: int) -> int:
    """N for one weight matrix: ``method.budget`` if given, else the budget of LoRA rank r_L, r_L (d_in + d_out)."""
    if method_config.budget is not None:
        return int(method_config.budget)
    return budget_from_lora_rank(method_config.lora_rank, d_in, d_out)


def method_rank(method_config, d_in: int, d_out: int) -> int:
    """The rank ``method_config.name`` uses on a d_out x d_in matrix under the shared budget N
    (per head for ravan, r_max for the heterogeneous-rank methods)."""
    name = method_config.name
    if name == "full_ft":
        return min(d_in, d_out)
    budget = per_matrix_budget(method_config, d_in, d_out)
    if name == "ravan":
        return rank_from_budget(budget, method_config.heads)
    if name == "fed_sb":
        rank = math.isqrt(budget)
    elif name in B_ONLY_METHODS:
        rank = budget // d_out
    elif name in LORA_RANK_METHODS:
        rank = budget // (d_in + d_out)
    else:
        raise ValueError(f"method_rank: unknown method '{name}'")
    if rank < 1:
        raise ValueError(
            f"method.budget {budget} is too small for {name} on a {d_out} x {d_in} matrix (rank would be 0); "
            f"raise method.budget or method.lora_rank"
        )
    if name in SVD_METHODS:
        rank = min(rank, d_in, d_out)
    return rank


def layer_summary(method_config, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What every method records under ``resolved.method`` besides its ranks: the adapted layers' shapes
    [d_out, d_in] and, for the parameter-efficient methods, the budget N of each."""
    summary: dict[str, Any] = {"layer_shapes": {name: [int(d_out), int(d_in)] for name, (d_out, d_in) in shapes.items()}}
    if method_config.name != "full_ft":
        summary["budget_per_matrix"] = {name: per_matrix_budget(method_config, d_in, d_out)
                                        for name, (d_out, d_in) in shapes.items()}
    return summary
