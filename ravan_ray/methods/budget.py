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

No method's rank may exceed min(d_in, d_out): the update is full rank there, and more rank only costs
memory (SVD-based methods, fed_sb, flexlora and fedsvd, cannot even have more singular directions). A
budget that asks for more is refused with the largest one that makes sense (:func:`check_rank_fits`).
FedSA-LoRA trains B as well, only keeps it local, so it gets the LoRA rank.
"""

from __future__ import annotations

import math
from typing import Any

from ravan_ray.adapters import budget_from_lora_rank, rank_from_budget

LORA_RANK_METHODS = ("fedit", "fedex_lora", "flora", "fedsa_lora", "hetlora", "flexlora", "rolora", "fed_plora")
B_ONLY_METHODS = ("ffa_lora", "fedsvd")


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
        rank = rank_from_budget(budget, method_config.heads)
        check_rank_fits(method_config, rank, budget, d_in, d_out)
        return rank
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
    check_rank_fits(method_config, rank, budget, d_in, d_out)
    return rank


def check_rank_fits(method_config, rank: int, budget: int, d_in: int, d_out: int) -> None:
    """A rank above min(d_in, d_out) adds nothing (the update is full rank at d) but memory: refuse it with
    the largest budget that makes sense. For Ravan that is heads of rank d (N = h d^2); its heads' total
    rank h r already reaches d at sqrt(N h) = d (N = d^2 / h), where PAPER.md says the gains stop."""
    d = min(d_in, d_out)
    if rank <= d:
        return
    given = (f"method.budget={method_config.budget}" if method_config.budget is not None
             else f"method.lora_rank={method_config.lora_rank}")
    name = method_config.name
    if name == "ravan":
        heads = method_config.heads
        saturation = math.ceil(d * d / heads)
        raise ValueError(
            f"{given} gives ravan's {heads} heads rank {rank} on a {d_out} x {d_in} matrix, more than {d}: use "
            f"method.budget <= {heads * d * d} (heads of rank {d}); the heads' total rank already reaches {d} at "
            f"sqrt(N h) = d, N = {saturation} (method.lora_rank ~ {max(1, saturation // (d_in + d_out))})")
    largest = d * d if name == "fed_sb" else d * d_out if name in B_ONLY_METHODS else d * (d_in + d_out)
    raise ValueError(
        f"{given} (N = {budget} per matrix) gives {name} rank {rank} on a {d_out} x {d_in} matrix, more than {d}, "
        f"where the update is already full rank: use method.budget <= {largest} "
        f"(method.lora_rank <= {largest // (d_in + d_out)})")


def full_rank_heads(budget: int, d: int) -> float:
    """The number of Ravan heads at which their total rank reaches d at a budget of N per matrix: h heads of
    rank sqrt(N / h) reach sqrt(N h) = d at h = d^2 / N; past it more heads add no rank (PAPER.md)."""
    return d * d / budget


def layer_summary(method_config, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What every method records under ``resolved.method`` besides its ranks: the adapted layers' shapes
    [d_out, d_in] and, for the parameter-efficient methods, the budget N of each."""
    summary: dict[str, Any] = {"layer_shapes": {name: [int(d_out), int(d_in)] for name, (d_out, d_in) in shapes.items()}}
    if method_config.name != "full_ft":
        summary["budget_per_matrix"] = {name: per_matrix_budget(method_config, d_in, d_out)
                                        for name, (d_out, d_in) in shapes.items()}
    return summary
