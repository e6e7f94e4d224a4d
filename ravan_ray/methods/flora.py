"""FLoRA: stacking-based aggregation (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024).

Every round each client trains a fresh LoRA (B = 0, A a new Gaussian draw) on top of the current global
weights. The server stacks the client modules along the rank axis with the client weights p_c,

    B_stack = [p_1 B_1, ..., p_m B_m]  (d_out x sum_c r_c),   A_stack = [A_1; ...; A_m]  (sum_c r_c x d_in),

so B_stack A_stack = sum_c p_c B_c A_c exactly, and merges the product into the weight of every adapted
layer. The broadcast is the stacked modules, whose size grows with the number of clients per round; every
client merges them into its copy of the model.

Choices the paper leaves open:
- the fresh A of a client is drawn per (run seed, round, client) with the scale of ``methods/lora.py``
  (N(0, 1/d_in)), like a fresh PEFT initialisation; homogeneous rank r = r_L from the shared budget;
- p_c follows ``method.aggregation_weights`` (uniform by default; FLoRA's data-size weights are
  ``num_samples``);
- state: the merged weights (``{layer}/base_weight``, what a client's model holds) and the last round's
  stacks (``{layer}/stack_A``, ``{layer}/stack_B``). Downlink counts the stacks and the task head for each
  sampled client, not the merged weights: a client is assumed to have merged every earlier broadcast
  (FLoRA's setting, where every client takes part in every round). A client that missed rounds would also
  need the stacks it missed; that catch-up is not counted. Round 1 sends only the task head.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ravan_ray.methods.base import HEAD_PREFIX, ClientTask, ClientUpdate, State, state_bytes
from ravan_ray.methods.fedex_lora import base_key
from ravan_ray.methods.lora import LORA_SCALE, LoRAMethod, factor_key

FRESH_A_STREAM = 4  # ClientTask.generator stream for the fresh A (0-3 are used by the training loop)
STACK_SUFFIXES = ("/stack_A", "/stack_B")


class FLoRA(LoRAMethod):
    name = "flora"
    exact = True

    def initial_state(self, model: nn.Module) -> State:
        state = self.head_state(model)
        for name, layer in self.adapted_modules(model).items():
            state[base_key(name)] = layer.base.weight.detach().clone()
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for layer in self.ranks:
            stack_B = torch.cat([float(w) * u.tensors[factor_key(layer, "lora_B")] for u, w in zip(updates, weights)], dim=1)
            stack_A = torch.cat([u.tensors[factor_key(layer, "lora_A")] for u in updates], dim=0)
            merged = sum(float(w) * (u.tensors[factor_key(layer, "lora_B")].double() @ u.tensors[factor_key(layer, "lora_A")].double())
                         for u, w in zip(updates, weights))
            old = state[base_key(layer)]
            new_state[base_key(layer)] = (old.double() + LORA_SCALE * merged).to(old.dtype)
            new_state[f"{layer}/stack_A"], new_state[f"{layer}/stack_B"] = stack_A, stack_B
        return new_state

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        sent = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX) or k.endswith(STACK_SUFFIXES)}
        return state_bytes(sent) * len(clients)

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)  # the head, and a client's own factors in a client view
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                layer.base.weight.copy_(state[base_key(name)])

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        generator = task.generator(stream=FRESH_A_STREAM)
        with torch.no_grad():
            for layer in self.adapted_modules(model).values():
                fresh = torch.randn(layer.lora_A.shape, generator=generator, dtype=torch.float64) / math.sqrt(layer.d_in)
                layer.lora_A.copy_(fresh)
                layer.lora_B.zero_()
        return super().begin_training(model, task, batch_loss)
