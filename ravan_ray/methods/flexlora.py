"""FlexLoRA: heterogeneous ranks through SVD redistribution (Bai et al., "Federated Fine-tuning of Large
Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024).

Clients train LoRAs of their own rank r_c (``HeterogeneousRankLoRA``: the first r_c ranks of the global
factors, the rest masked). The server forms every client's full-size update, the product scaled as the
client applied it, averages them,

    dW = sum_c w_c (alpha / r_c) B_c A_c,

and takes its SVD dW = U S V^T. A client of rank r_c restarts from the best rank-r_c approximation of dW:
A = V^T[:r_c] and B = U[:, :r_c] S[:r_c] / (alpha / r_c), so that its scaled LoRA starts exactly there.

Choices the paper leaves open, and how dW relates to the base weights:
- the global model is W0 + dW with the full-size dW (FlexLoRA's "full-size LoRA weight" merged into the
  pretrained weights): that is what is evaluated, and it is the exact weighted mean of the clients'
  updates, so ``agg_error`` is ~0 here. dW is kept under ``eval/`` (the server's only, not downlink).
  What is lossy is the redistribution: clients restart from a rank-r_c truncation of dW (r_c <= r_max),
  and the next dW is built from those, so whatever dW held beyond rank r_max is lost every round;
- the server broadcasts the rank-r_max factors (B = U_r S_r, A = V_r^T with r = r_max, S folded into B so
  A keeps orthonormal rows like a fresh LoRA A keeps unit-norm ones) once per round; each client takes the
  first r_c columns / rows itself, which is the rank-r_c truncation since singular values are sorted;
- the weights w_c follow ``method.aggregation_weights``; unset, they are the clients' data sizes, as FlexLoRA's
  paper and code weigh dW (``num_samples``);
- r_max = r_L from the shared budget (at most min(d_in, d_out)), r_c = ``budgets.rank_for_level``;
- scaling alpha / r_c per client with alpha = 2 r_c by default (scale 2 for every client), as FLoRA's public
  code builds its heterogeneous-rank clients (``lora_alpha=2*local_ranks[client_id]``); FlexLoRA's own
  FederatedScope branch was not available here. The broadcast factors are those of dW itself (unscaled) and
  each client divides its B by its own scale, which keeps the redistribution exact for any ``lora_alpha``;
- the first round starts from the standard LoRA initialisation (B = 0, A Gaussian); SVDs are in float64;
- client-level DP (``privacy.mode: client``): dW is the mean of the clients' products, not of their factors, so a
  client's update is the change of its effective weight, (alpha / r_c) B_c A_c minus the rank-r_c truncation of
  the last dW it started from (public: the broadcast and its rank), with its task-head change, clipped jointly
  to C; the noise goes on their sum, and dW = mean of the truncations + the noised mean update. Its SVD is
  post-processing; a noised dW has full rank, so it is taken of the dense matrix (O(d_out d_in min(d_out, d_in))
  per layer and round, where the factors' route above costs O((d_out + d_in) R^2)). At z = 0 and C = inf the run
  is FlexLoRA's with uniform weights (client-level DP's) up to float64 rounding.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ravan_ray.methods.base import EVAL_PREFIX, ClientTask, ClientUpdate, State
from ravan_ray.methods.lora import HeterogeneousRankLoRA, factor_key, weight_update_key
from ravan_ray.methods.private_terms import with_private_terms


def delta_key(layer: str) -> str:
    return f"{EVAL_PREFIX}{layer}/delta"


def truncated_factors(B_cat: torch.Tensor, A_cat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r S_r, V_r^T) of dW = B_cat A_cat = sum_c B_c A_c (the clients' factors stacked along the
    rank axis): its best rank-``rank`` approximation (Eckart-Young).

    dW has rank at most R = sum_c r_c (24 for 3 clients of rank 8), so its SVD comes from the factors
    instead of the d_out x d_in matrix: with B_cat = Q_B R_B and A_cat^T = Q_A R_A (thin QR),
    dW = Q_B (R_B R_A^T) Q_A^T, and the SVD U' S V'^T of the R x R middle gives U = Q_B U', V = Q_A V'.
    That is O((d_out + d_in) R^2) instead of O(d_out d_in min(d_out, d_in)): ~50x less work at d = 384.
    When R < rank the missing right singular vectors (singular value 0) complete V to an orthonormal
    set, as a full SVD's would, so the client's extra ranks start like a fresh LoRA (B = 0, A orthonormal)
    and can train; B is zero there."""
    B_cat, A_cat = B_cat.double(), A_cat.double()
    inner = B_cat.shape[1]
    Q_B, R_B = torch.linalg.qr(B_cat)
    Q_A, R_A = torch.linalg.qr(A_cat.T, mode="complete" if inner < rank else "reduced")
    U, S, Vh = torch.linalg.svd(R_B @ R_A[:inner].T)
    kept = min(rank, inner)
    B = torch.zeros(B_cat.shape[0], rank, dtype=torch.float64)
    B[:, :kept] = (Q_B @ U[:, :kept]) * S[:kept]
    A = torch.cat([Vh[:kept] @ Q_A[:, :inner].T, Q_A[:, inner:rank].T])
    return B, A


def dense_truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of a dense dW (under client-level DP, where noise makes it full-rank)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


class FlexLoRA(HeterogeneousRankLoRA):
    name = "flexlora"
    reference_weights = "num_samples"
    changes_base_weights = True  # merges updates into W
    merged_export_only = "FlexLoRA's global model is W0 plus the full-size mean update, not a rank-r LoRA"
    exact = False
    alpha_per_rank = 2.0

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        private = any(weight_update_key(layer) in u.tensors for u in updates for layer in self.ranks)
        for layer, rank in self.ranks.items():
            b_key, a_key = factor_key(layer, "lora_B"), factor_key(layer, "lora_A")
            if private:
                delta = sum(float(w) * (self.start_product(state, u, layer) + u.tensors[weight_update_key(layer)])
                            for u, w in zip(updates, weights))
                B, A = dense_truncated_factors(delta, rank)
            else:
                B_cat = torch.cat([float(w) * self.lora_scale(self.uploaded_rank(u, layer)) * u.tensors[b_key].double()
                                   for u, w in zip(updates, weights)], dim=1)
                A_cat = torch.cat([u.tensors[a_key].double() for u in updates], dim=0)
                delta = B_cat @ A_cat  # sum_c w_c (alpha / r_c) B_c A_c
                B, A = truncated_factors(B_cat, A_cat, rank)
            dtype = state[b_key].dtype
            new_state[b_key], new_state[a_key] = B.to(dtype), A.to(dtype)
            new_state[delta_key(layer)] = delta.to(dtype)
        return new_state

    # ----------------------------------------------------------------- differential privacy
    def start_product(self, state: State, update: ClientUpdate, layer: str) -> torch.Tensor:
        """The effective weight update the client started from: the rank-r_c truncation of the broadcast dW."""
        rank = self.uploaded_rank(update, layer)
        B, A = state[factor_key(layer, "lora_B")], state[factor_key(layer, "lora_A")]
        return B[:, :rank].double() @ A[:rank].double()

    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """The task head's change and each layer's (alpha / r_c) B_c A_c minus the truncation it started from."""
        delta = super().privacy_delta(state, self.task_head_only(update))
        for layer in self.ranks:
            started = self.start_product(state, update, layer)
            delta[weight_update_key(layer)] = self.client_delta(update, layer) - started
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        task_head = self.task_head_only(update)
        private = super().with_privacy_delta(state, task_head, {k: delta[k] for k in task_head.tensors})
        return with_private_terms(update, private, delta)

    # ----------------------------------------------------------------- client
    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        """Truncate to r_c (``HeterogeneousRankLoRA``), then divide B by the client's scale: its LoRA then starts at
        the rank-r_c truncation of dW."""
        meta = super().begin_training(model, task, batch_loss)
        with torch.no_grad():
            for layer in self.adapted_modules(model).values():
                layer.lora_B.div_(layer.scale)
        return meta

    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        """A client loads the r_max factors; the global model (only the server holds ``eval/`` keys) is
        W0 + dW with the full-size dW."""
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                if delta_key(name) in state:
                    layer.lora_B.zero_()
                    layer.base.weight += state[delta_key(name)].to(layer.base.weight.dtype)
