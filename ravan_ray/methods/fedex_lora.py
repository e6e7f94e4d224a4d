"""FedEx-LoRA: exact aggregation for federated LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Foundation Models", ACL 2025).

As FedIT, clients train LoRA B and A and the server averages them separately; in addition it folds the
residual

    R = sum_c w_c B_c A_c - (sum_c w_c B_c)(sum_c w_c A_c)

into the frozen weight of every adapted layer, W <- W + R. Then W + mean(B) mean(A) = W + mean(B_c A_c):
exact. The updated weights are part of the broadcast state (``{layer}/base_weight``), so the downlink
carries a full d_out x d_in matrix per adapted layer every round, as in the paper (clients must receive
the new W); the uplink is the LoRA factors only.

Choices the paper leaves open: rank r = r_L from the shared budget; no alpha / r scaling; client weights
follow ``method.aggregation_weights``; the residual is computed in float64 and W is kept in the model's
dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ravan_ray.methods.base import ClientUpdate, State
from ravan_ray.methods.lora import LORA_SCALE, LoRAMethod, factor_key


def base_key(layer: str) -> str:
    return f"{layer}/base_weight"


class FedExLoRA(LoRAMethod):
    name = "fedex_lora"
    changes_base_weights = True  # merges updates into W
    exact = True

    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        for name, layer in self.adapted_modules(model).items():
            state[base_key(name)] = layer.base.weight.detach().clone()
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = self.average_factors(state, updates, weights)
        for layer in self.ranks:
            a_key, b_key = factor_key(layer, "lora_A"), factor_key(layer, "lora_B")
            mean_of_products = sum(float(w) * (u.tensors[b_key].double() @ u.tensors[a_key].double())
                                   for u, w in zip(updates, weights))
            residual = mean_of_products - new_state[b_key].double() @ new_state[a_key].double()
            old = state[base_key(layer)]
            new_state[base_key(layer)] = (old.double() + LORA_SCALE * residual).to(old.dtype)
        return new_state

    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                layer.base.weight.copy_(state[base_key(name)])
