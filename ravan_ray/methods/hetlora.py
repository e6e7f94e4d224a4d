"""HetLoRA: heterogeneous LoRA ranks (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432).

The paper's three steps, per round:

1. distribution via truncation: the global LoRA has rank r_max; a client of rank r_c keeps its first r_c ranks
   (the rest masked and zeroed: ``HeterogeneousRankLoRA``);
2. local training with rank self-pruning: the local objective adds lambda ||B_T|| ||A_T|| on the client's last
   ranks T = [floor(gamma r_c), r_c) (gamma < 1 the decay factor); after local training, if that norm product
   is smaller than it was at the start of the round (the truncated global's), the client prunes those ranks:
   r_c <- floor(gamma r_c), and uploads only B[:, :r_c], A[:r_c]. The pruned rank is the client's from then on
   (it stays in the client state; a client never grows back);
3. sparsity-weighted aggregation: the server zero-pads every upload back to r_max and averages the padded
   factors with weights p_c proportional to the Frobenius norm of the client's update s_c B_c A_c.

The next round each client truncates the new global to its own rank again. Averaging factors is not averaging
products, and the padding and the norm weights move the result further from the plain mean: inexact
(``agg_error`` measures the distance to the mean with ``method.aggregation_weights``).

Choices the paper leaves open:
- r_max = r_L, the LoRA rank of the shared budget; r_c = ``budgets.rank_for_level`` (at least 1), lowered by
  the client's own pruning;
- hyper-parameters: ``method.hetlora_gamma`` (decay factor, 0.99 by default: one rank of 8 at a time;
  1 turns pruning off) and ``method.hetlora_lambda`` (penalty weight, 0.01 by default; this value is this
  project's choice, 0 keeps the norm rule but drops the penalty). The penalty is added to the loss the
  clients minimise (and report as train_loss) at every local step (``local_penalty``);
- pruning and the norm rule act per adapted layer (the paper states them for one weight matrix); a client of
  rank 1 in a layer cannot prune further there;
- the sparsity weights: ``method.hetlora_norm: layer`` (default) computes p_c per adapted layer from that
  layer's updates, the paper's single-matrix formula applied to each matrix; ``model`` uses one weight per
  client from the norm of its whole update (all adapted layers together), for every layer. With
  ``aggregation_weights: num_samples`` the norms are multiplied by the data sizes before normalising; if every
  norm is zero the layer falls back to the plain client weights;
- scaling alpha / r_c per client with alpha = 2 r_c by default (scale 2, equal for all clients), as the
  zero-padding heterogeneous-rank baseline in FLoRA's public code builds its clients
  (``lora_alpha=2*local_ranks[client_id]``); no HetLoRA code is public. The global model uses alpha / r_max;
- the server broadcasts the r_max factors and every client truncates them (downlink r_max-sized);
- client-level DP (``privacy.mode: client``): the sparsity weights come from each client's own update norm, so
  the weighted mean is not a function of the sum of the uploads; it is a ratio of two sums, which is. With
  n_c the client's norm, m_c its rank mask (1 on its first r_c ranks) and dB_c = pad(B_c) - B m_c its change
  from the broadcast's truncation (dA_c likewise),
      sum_c n_c pad(B_c) / sum_c n_c = (B diag(sum_c n_c m_c) + sum_c n_c dB_c) / sum_c n_c,
  so a client's update is (n_c dB_c, n_c dA_c, n_c m_c) with its task-head change, clipped jointly to C (a
  clipped client thereby has a smaller weight in both sums, as in McMahan et al.'s weighted estimator), and the
  noise goes on their sum. The ratio of the noised sums is post-processing. A denominator near zero would blow
  the ratio up, so a layer keeps its broadcast factors in a round whose noised sum of norms is below three
  standard deviations of its noise (this project's choice: the clients' norms do not stand out of the noise;
  with few clients per round that is most rounds, with a hundred it is none). Choosing C: the
  update norm is about n_c (||dB_c|| + ||dA_c|| + sqrt(r_c)), larger than the plain update (the
  ``update_norm`` column reports it). At z = 0 and C = inf it is HetLoRA up to float64 rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ravan_ray.config import ConfigError, Options
from ravan_ray.methods.base import ClientTask, ClientUpdate, State, weighted_mean
from ravan_ray.methods.lora import HeterogeneousRankLoRA, factor_key
from ravan_ray.methods.private_terms import NOISE_STD, with_private_terms


#: under client-level DP a layer is updated only when its noised sum of norms exceeds this many noise stds
NOISE_STDS_TO_UPDATE = 3.0


def weighted_key(layer: str, term: str) -> str:
    """Under client-level DP, a client's norm-weighted term of one layer (``lora_B``, ``lora_A`` or ``weight``)."""
    return f"{layer}/weighted_{term}"


def rank_key(layer: str) -> str:
    return f"{layer}/rank"


def tail_start(rank: int, gamma: float) -> int:
    """The first of the ranks a client may prune: floor(gamma r), at least 1 (a LoRA keeps one rank)."""
    return max(1, math.floor(gamma * rank))


def tail_norm(layer: nn.Module, start: int, stop: int) -> torch.Tensor:
    """||B[:, start:stop]||_F ||A[start:stop]||_F, differentiable."""
    return torch.linalg.matrix_norm(layer.lora_B[:, start:stop]) * torch.linalg.matrix_norm(layer.lora_A[start:stop])


class HetLoRAOptions(Options):
    # Rank self-pruning: the decay factor gamma (a client may prune its last r - floor(gamma r) ranks; 1 turns
    # pruning off) and the weight lambda of the penalty on those ranks in the local objective.
    hetlora_gamma: float = Field(0.99, gt=0, le=1)
    hetlora_lambda: float = Field(0.01, ge=0, allow_inf_nan=False)
    # The sparsity weights from the norm of each client's update per adapted layer, or over the whole model.
    hetlora_norm: Literal["layer", "model"] = "layer"


class HetLoRA(HeterogeneousRankLoRA):
    name = "hetlora"
    exact = False
    alpha_per_rank = 2.0
    options_model = HetLoRAOptions

    def __init__(self, config):
        super().__init__(config)
        self._pruned: dict[str, int] = {}  # the client's ranks after its earlier pruning (its client state)
        self._tails: dict[str, tuple[int, int, float]] = {}  # layer -> (start, stop, tail norm at the start)

    def client_rank(self, level: float, layer: str) -> int:
        rank = super().client_rank(level, layer)
        return min(rank, self._pruned.get(layer, rank))

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        self._tails = {}  # no penalty outside a client's local training
        self._pruned = {} if client_state is None else {
            layer: int(client_state[rank_key(layer)]) for layer in self.ranks if rank_key(layer) in client_state}
        super().load_state(model, state, client_state)

    def check_privacy(self, mechanism) -> None:
        """DP-SGD clips and noises per-example gradients, which the pruning penalty (a function of B and A, not of
        any example) does not have: the penalty would silently drop out of the objective, so it is refused."""
        super().check_privacy(mechanism)
        if mechanism.per_example_gradients and self.options.hetlora_lambda > 0:
            raise ConfigError("privacy.mode=sample leaves HetLoRA's pruning penalty out of DP-SGD's per-example "
                              "gradients; set method.hetlora_lambda=0 to run HetLoRA without it")

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        layers = self.adapted_modules(model)
        self._tails = {}
        for name, layer in layers.items():
            rank = meta["rank"][name]
            start = tail_start(rank, self.options.hetlora_gamma)
            if start < rank:
                self._tails[name] = (start, rank, float(tail_norm(layer, start, rank).detach()))
        return meta

    def local_penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """lambda x the sum over layers of ||B_tail||_F ||A_tail||_F: the ranks the client may prune are pushed
        towards zero while it trains."""
        lam = self.options.hetlora_lambda
        if lam <= 0 or not self._tails:
            return None
        layers = self.adapted_modules(model)
        return lam * sum(tail_norm(layers[n], start, stop) for n, (start, stop, _) in self._tails.items())

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        """Prune where the norm rule says so, then upload the (possibly pruned) first ranks."""
        layers = self.adapted_modules(model)
        pruned = {}
        for name, (start, stop, before) in self._tails.items():
            after = float(tail_norm(layers[name], start, stop).detach())
            pruned[name] = after < before
            if pruned[name]:
                meta["rank"][name] = start
        meta["pruned"] = pruned
        tensors, _ = super().upload(model, task, meta)
        ranks = {rank_key(name): torch.tensor(rank, dtype=torch.int64) for name, rank in meta["rank"].items()}
        self._tails = {}  # the penalty goes with the task
        return tensors, ranks

    # ----------------------------------------------------------------- server
    def sparsity_norm(self, update: ClientUpdate, layer: str) -> float:
        """||s_c B_c A_c||_F of this layer, or of the whole update with ``hetlora_norm: model``."""
        scope = self.ranks if self.options.hetlora_norm == "model" else [layer]
        return math.sqrt(sum(float(torch.linalg.matrix_norm(self.client_delta(update, name))) ** 2 for name in scope))

    def sparsity_weights(self, updates: list[ClientUpdate], layer: str, client_weights: np.ndarray) -> np.ndarray:
        """p_c proportional to the clients' sparsity norms (times the data-size weight when configured), summing
        to 1."""
        norms = np.array([self.sparsity_norm(u, layer) for u in updates])
        if self.aggregation_weighting(self.config) == "num_samples":
            norms = norms * client_weights
        if norms.sum() <= 0:
            return client_weights
        return norms / norms.sum()

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        private = any(weighted_key(layer, "weight") in u.tensors for u in updates for layer in self.ranks)
        for layer in self.ranks:
            if private:
                new_state.update(self.private_weighted_factors(state, updates, layer))
                continue
            padded = [self.padded_factors(u, layer) for u in updates]
            p = self.sparsity_weights(updates, layer, weights)
            new_state[factor_key(layer, "lora_B")] = weighted_mean([b for b, _ in padded], p)
            new_state[factor_key(layer, "lora_A")] = weighted_mean([a for _, a in padded], p)
        return new_state

    # ----------------------------------------------------------------- differential privacy
    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """The task head's change and, per layer, (n_c dB_c, n_c dA_c, n_c m_c) (see the module docstring)."""
        delta = super().privacy_delta(state, self.task_head_only(update))
        for layer, rank in self.ranks.items():
            norm = self.sparsity_norm(update, layer)
            mask = (torch.arange(rank) < self.uploaded_rank(update, layer)).double()
            B, A = (t.double() for t in self.padded_factors(update, layer))
            B_global, A_global = (state[factor_key(layer, f)].double() for f in ("lora_B", "lora_A"))
            delta[weighted_key(layer, "lora_B")] = norm * (B - B_global * mask)
            delta[weighted_key(layer, "lora_A")] = norm * (A - A_global * mask[:, None])
            delta[weighted_key(layer, "weight")] = norm * mask
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        task_head = self.task_head_only(update)
        private = super().with_privacy_delta(state, task_head, {k: delta[k] for k in task_head.tensors})
        return with_private_terms(update, private, delta)

    def private_weighted_factors(self, state: State, updates: list[ClientUpdate], layer: str) -> State:
        """B and A from the noised sums: (B diag(sum n_c m_c) + sum n_c dB_c) / sum n_c, A likewise; the broadcast
        factors where the noised sum of norms is not above three standard deviations of its noise (and positive)."""
        b_key, a_key = factor_key(layer, "lora_B"), factor_key(layer, "lora_A")
        weight = sum(u.tensors[weighted_key(layer, "weight")] for u in updates)  # sum_c n_c m_c (+ noise)
        total = float(weight[0])  # every client keeps rank 1 at least, so entry 0 is sum_c n_c
        noise_std = max(float(u.meta.get(NOISE_STD, 0.0)) for u in updates)
        if not (total > 0 and total > NOISE_STDS_TO_UPDATE * noise_std):
            return {b_key: state[b_key], a_key: state[a_key]}
        B = (state[b_key].double() * weight + sum(u.tensors[weighted_key(layer, "lora_B")] for u in updates)) / total
        A = (state[a_key].double() * weight[:, None]
             + sum(u.tensors[weighted_key(layer, "lora_A")] for u in updates)) / total
        return {b_key: B.to(state[b_key].dtype), a_key: A.to(state[a_key].dtype)}
