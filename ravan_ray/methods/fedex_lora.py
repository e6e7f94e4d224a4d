"""FedEx-LoRA: exact aggregation for federated LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Foundation Models", ACL 2025).

As FedIT, clients train LoRA B and A and the server averages them separately; in addition it folds the
residual

    R = s (sum_c w_c B_c A_c - (sum_c w_c B_c)(sum_c w_c A_c)),   s = alpha / r,

into the frozen weight of every adapted layer, W <- W + R. Then W + s mean(B) mean(A) = W + s mean(B_c A_c):
exact. The updated weights are part of the broadcast state (``{layer}/base_weight``), so the downlink carries
a full d_out x d_in matrix per adapted layer every round, as in the paper (clients must receive the new W);
the uplink is the LoRA factors only.

Choices the paper leaves open:
- rank r = r_L from the shared budget; scaling alpha / r with alpha = 2 r by default (scale 2), as FedEx-LoRA's
  code (``fed_train_glue.py``: ``--lora_r 4``, ``--lora_alpha 8``);
- round 1's downlink does not count W: until the first residual is folded in it is the pretrained weight every
  client already has (a flag under ``eval/`` tells the server; from round 2 on W is sent every round);
- client weights follow ``method.aggregation_weights``; unset, uniform, as the code's plain mean (fedex-lora
  ``fed_agg.py`` ``aggregate_models_ours``: ``sum(B_i @ A_i) / len(client_models)``, ``.mean(0)``); the residual
  is computed in float64 and W is kept in the model's dtype;
- client-level DP (``privacy.mode: client``): the residual needs the mean of the clients' products, which the
  sums of the factors do not give. A client's update is therefore its factor changes (B_c - B, A_c - A) together
  with the change of its effective weight s (B_c A_c - B A), all clipped jointly to C; the noise on the sum of
  all three gives noised means of B_c, A_c and B_c A_c, and the rule above is applied to those. The price is
  noise on a full d_out x d_in matrix per adapted layer (W moves by the noised residual every round), which a
  method that only averages factors does not pay; with z = 0 and C = inf it is FedEx-LoRA up to float64
  rounding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ravan_ray.methods.base import EVAL_PREFIX, ClientUpdate, State, state_bytes
from ravan_ray.methods.lora import LoRAMethod, factor_key, factor_product, weight_update_key
from ravan_ray.methods.private_terms import with_private_terms

#: 1 while every W in the state is still the pretrained weight (which no client needs to receive)
PRETRAINED_W = EVAL_PREFIX + "fedex_lora/base_is_pretrained"


def base_key(layer: str) -> str:
    return f"{layer}/base_weight"


class FedExLoRA(LoRAMethod):
    name = "fedex_lora"
    changes_base_weights = True  # merges updates into W
    merged_export_only = "FedEx-LoRA folds its aggregation residual into the frozen weights W"
    exact = True
    alpha_per_rank = 2.0

    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        for name, layer in self.adapted_modules(model).items():
            state[base_key(name)] = layer.base.weight.detach().clone()
        state[PRETRAINED_W] = torch.ones(1, dtype=torch.uint8)
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = self.average_factors(state, updates, weights)
        for layer, rank in self.ranks.items():
            a_key, b_key = factor_key(layer, "lora_A"), factor_key(layer, "lora_B")
            mean_of_products = sum(float(w) * self.client_product(state, u, layer) for u, w in zip(updates, weights))
            residual = mean_of_products - new_state[b_key].double() @ new_state[a_key].double()
            old = state[base_key(layer)]
            new_state[base_key(layer)] = (old.double() + self.lora_scale(rank) * residual).to(old.dtype)
        new_state[PRETRAINED_W] = torch.zeros(1, dtype=torch.uint8)
        return new_state

    def client_product(self, state: State, update: ClientUpdate, layer: str) -> torch.Tensor:
        """B_c A_c, or under client-level DP the broadcast's B A plus the client's noised weight update / s."""
        private = update.tensors.get(weight_update_key(layer))
        if private is None:
            return factor_product(update.tensors, layer)
        return factor_product(state, layer) + private / self.lora_scale(self.ranks[layer])

    # ----------------------------------------------------------------- differential privacy
    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """The head's and the factors' changes, and the change of the client's effective weight s (B_c A_c - B A)."""
        delta = super().privacy_delta(state, update)
        for layer, rank in self.ranks.items():
            delta[weight_update_key(layer)] = self.lora_scale(rank) * (factor_product(update.tensors, layer)
                                                                       - factor_product(state, layer))
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        private = super().with_privacy_delta(state, update, {k: v for k, v in delta.items() if k in update.tensors})
        return with_private_terms(update, private, delta)

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        pretrained = bool(state.get(PRETRAINED_W, torch.zeros(1))[0])
        sent = {k: v for k, v in state.items()
                if not k.startswith(EVAL_PREFIX) and not (pretrained and k.endswith("/base_weight"))}
        return state_bytes(sent) * len(clients)

    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                layer.base.weight.copy_(state[base_key(name)])
