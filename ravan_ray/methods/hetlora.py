"""HetLoRA: heterogeneous LoRA ranks (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024).

The global LoRA has rank r_max; a client at budget level l_c keeps its first r_c = round(l_c r_max) ranks
(the rest masked and zeroed), trains them and uploads B[:, :r_c], A[:r_c] (``HeterogeneousRankLoRA``).
The server zero-pads every upload back to r_max and averages the padded factors with HetLoRA's
sparsity weights: client c weighs in proportion to the Frobenius norm of its update, ||B_c A_c||_F.
The next round each client truncates the new global to its own rank again. Averaging factors is not
averaging products, and the padding and the norm weights move the result further from the plain mean:
inexact (``agg_error`` measures the distance to the mean with ``method.aggregation_weights``).

Choices the paper leaves open:
- r_max = r_L, the LoRA rank of the shared budget; r_c = ``budgets.rank_for_level`` (at least 1);
- the sparsity weights are computed per adapted layer (each layer's factors are averaged with the norms
  of that layer's client updates); with ``aggregation_weights: num_samples`` they are multiplied by the
  data sizes before normalising; if every update of a layer is zero the layer falls back to the plain
  client weights;
- HetLoRA's rank self-pruning (a client lowering its rank during training when its last ranks carry
  little norm) is omitted: a client's rank is fixed by its budget level;
- the server broadcasts the r_max factors and every client truncates them (downlink r_max-sized);
- no alpha / r scaling (``methods/lora.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ravan_ray.methods.base import ClientUpdate, State, weighted_mean
from ravan_ray.methods.lora import HeterogeneousRankLoRA, factor_key


class HetLoRA(HeterogeneousRankLoRA):
    name = "hetlora"
    exact = False

    def sparsity_weights(self, updates: list[ClientUpdate], layer: str, client_weights: np.ndarray) -> np.ndarray:
        """p_c proportional to ||B_c A_c||_F (times the data-size weight when configured), summing to 1."""
        norms = np.array([float(torch.linalg.matrix_norm(
            u.tensors[factor_key(layer, "lora_B")].double() @ u.tensors[factor_key(layer, "lora_A")].double()))
            for u in updates])
        if self.config.method.aggregation_weights == "num_samples":
            norms = norms * client_weights
        if norms.sum() <= 0:
            return client_weights
        return norms / norms.sum()

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for layer in self.ranks:
            padded = [self.padded_factors(u, layer) for u in updates]
            p = self.sparsity_weights(updates, layer, weights)
            new_state[factor_key(layer, "lora_B")] = weighted_mean([b for b, _ in padded], p)
            new_state[factor_key(layer, "lora_A")] = weighted_mean([a for _, a in padded], p)
        return new_state
