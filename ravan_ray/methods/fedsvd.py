"""FedSVD: adaptive orthogonalisation of LoRA through the SVD (Lee et al., "FedSVD: Adaptive Orthogonalization
for Private Federated Learning with LoRA", NeurIPS 2025, arXiv 2505.12805; code: github.com/seanie12/fed-svd).

Clients train only B (d_out x r) against the broadcast A (r x d_in), as in FFA-LoRA, and upload B. The server
averages the B's, forms the product with the A the clients used, and refactorises it through its SVD,

    B_mean A = U S V^T   ->   A <- V_r^T (orthonormal rows),   B <- U_r S_r,

and broadcasts both. Since every client trained against the same A, B_mean A = mean(B_c A) is the exact mean
of the clients' updates, and the refactorisation does not change the product (B A has rank at most r):
exact (``agg_error`` ~ 0). What changes is A: each round it becomes the orthonormal basis of the principal
directions of the aggregated update, which the paper argues bounds B's gradients and helps under DP-SGD.

As the reference code runs it (``scripts/run_non_dp.sh``: ``--model ffa --recalculate-svd-period 1``;
``misc/utils.py`` ``reinit_lora``; ``fedmm/fedavg/server.py``), the SVD is redone after every round and
clients receive both factors.

Choices the paper and code leave open:
- rank: only B trains, so the budget gives it FFA-LoRA's r = floor(N / d_out) (2 r_L on square matrices),
  at most min(d_in, d_out) (``methods/budget.py``); A starts as the platform's seeded N(0, 1/d_in) draw, the
  same on every client (the code uses PEFT's Kaiming-uniform A); B starts at 0;
- the SVD is taken from the factors (``flexlora.truncated_factors``: QR of each side, SVD of the r x r middle),
  O((d_in + d_out) r^2) rather than the dense d_out x d_in SVD of the code; the product and the singular
  triplets are the same. Where B_mean A has fewer than r non-zero singular values (round 1 before any
  training, or a B with dependent columns) the code's dense SVD completes A with arbitrary orthonormal rows;
  here they are completed inside A's current row space, so A never jumps to directions no client saw;
- scaling alpha / r with alpha = r by default (scale 1), as the code (``--lora-alpha 8 --lora-rank 8``);
- the task head follows ``model.train_head`` like every method (the code freezes RoBERTa's classifier);
- client weights follow ``method.aggregation_weights``; unset, they are the clients' data sizes, as the code
  (``fedmm/fedavg/server.py`` ``update``: ``train_size / sum`` unless ``--balanced``, which its scripts do not
  pass); the SVD is in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ravan_ray.methods.base import ClientTask, ClientUpdate, State, weighted_mean
from ravan_ray.methods.budget import B_ONLY
from ravan_ray.methods.flexlora import truncated_factors
from ravan_ray.methods.lora import LoRAMethod, factor_key


def refactorise(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's server step: (U_r S_r, V_r^T) of B A, with the rank r of the factors; B' A' = B A, A' A'^T = I."""
    return truncated_factors(B, A, A.shape[0])


class FedSVD(LoRAMethod):
    name = "fedsvd"
    reference_weights = "num_samples"
    exact = True
    shared_factors = ("lora_A", "lora_B")  # both are broadcast (A changes every round) ...
    trained_factors = ("lora_B",)  # ... but clients train and upload B only
    alpha_per_rank = 1.0
    rank_rule = B_ONLY  # only B trains (A is set by the server's SVD): r = floor(N / d_out)
    # the paper's protocol chose 0.02 on validation in each of 3 seeds of Banking77 (0.01 there: 6.8 points lower on
    # validation) and in 1 of 3 seeds of 20 Newsgroups, where 0.02's mean validation accuracy over the seeds is
    # level with 0.01's (23.3 against 22.2 %): 0.02 costs least on both (benchmarks/RESULTS.md, "The paper's protocol")
    default_lr = 2e-2

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for layer in self.ranks:
            b_key, a_key = factor_key(layer, "lora_B"), factor_key(layer, "lora_A")
            B_mean = weighted_mean([u.tensors[b_key].double() for u in updates], weights)
            B, A = refactorise(B_mean, state[a_key].double())
            new_state[b_key], new_state[a_key] = B.to(state[b_key].dtype), A.to(state[a_key].dtype)
        return new_state

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        return {k: v for k, v in tensors.items() if not k.endswith("/lora_A")}, None
