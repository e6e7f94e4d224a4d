"""FLoRA: stacking-based aggregation (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024).

Every round each client trains a fresh LoRA (B = 0, A a new Gaussian draw) on top of the current global
weights. The server stacks the client modules along the rank axis with the client weights p_c,

    B_stack = [p_1 B_1, ..., p_m B_m]  (d_out x sum_c r_c),   A_stack = [A_1; ...; A_m]  (sum_c r_c x d_in),

so B_stack A_stack = sum_c p_c B_c A_c exactly, and merges s B_stack A_stack (s = alpha / r) into the weight of
every adapted layer. The broadcast is the stacked modules, whose size grows with the number of clients per
round; every client merges them into its copy of the model.

Downlink and clients that missed rounds: a client holds the global weights of the last round whose stacks it
merged. A sampled client that took part in the previous round needs that round's stacks; one that has been
absent for k rounds (or was never sampled) needs the stacks of every round it missed, or instead the merged
weights of the adapted layers, whichever is smaller (the server sends the cheaper). The server keeps, under
``eval/`` (bookkeeping, never sent), the round each client last synchronised to and the byte size of every
round's stacks, and charges each sampled client its own catch-up plus the task head.

Choices the paper leaves open:
- the fresh A of a client is drawn per (run seed, round, client) with the scale of ``methods/lora.py``
  (N(0, 1/d_in)), like a fresh PEFT initialisation; homogeneous rank r = r_L from the shared budget;
- scaling alpha / r with alpha = 2 r by default (scale 2), as FLoRA's code (``main.py``: ``lora_r=8,
  lora_alpha=16``; heterogeneous clients ``lora_alpha=2*local_ranks[client_id]``; the stacked module
  ``r = lora_r * num_clients, lora_alpha = lora_alpha * num_clients``, the same scale);
- p_c follows ``method.aggregation_weights``; unset, it is the clients' data sizes, as FLoRA's code
  (``fed_utils/model_aggregation.py``: ``normalize(local_dataset_len_dict[...], p=1)``); FLoRA's code puts p_c on
  A, here it is on B: the product is the same;
- state: the merged weights (``{layer}/base_weight``, what a client's model holds) and the last round's stacks
  (``{layer}/stack_A``, ``{layer}/stack_B``). Round 1 sends only the task head;
- client-level DP (``privacy.mode: client``): the stacks publish every client's own factors, which no noise on a
  sum can privatise, so a private round broadcasts what they encode instead, the merged update s sum_c p_c B_c A_c
  of each adapted layer, made private: a client's update is its weight change s B_c A_c (its fresh LoRA starts
  at B = 0) with its task-head change, clipped jointly to C, and the noise goes on their sum. The model is the
  same as FLoRA's with uniform weights (client-level DP's) at z = 0 and C = inf (up to float64 rounding); the
  downlink is then a dense d_out x d_in update per layer (or the merged weights for a client that missed rounds),
  no longer the stacks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ravan_ray.methods.base import (EVAL_PREFIX, HEAD_PREFIX, SYNCED_KEY, ClientTask, ClientUpdate, State,
                                    initial_sync, mark_synced, state_bytes, synced_round)
from ravan_ray.methods.fedex_lora import base_key
from ravan_ray.methods.lora import LoRAMethod, factor_key, factor_product, weight_update_key
from ravan_ray.methods.private_terms import with_private_terms

FRESH_A_STREAM = 6  # ClientTask.generator stream for the fresh A (0-3: the training loop, 4: DP-SGD, 5: FedP-LoRA)
STACK_SUFFIXES = ("/stack_A", "/stack_B")
STACK_BYTES = EVAL_PREFIX + "flora/stack_bytes"  # entry t: the bytes of round t's stacks (entry 0: none)


def catch_up_bytes(stack_bytes: torch.Tensor, synced: int, merged_bytes: int) -> int:
    """What a client that holds the weights of round ``synced`` needs to reach the newest round: the stacks of
    the rounds it missed, or the merged weights when those are smaller."""
    missed = int(stack_bytes[synced + 1:].sum())
    return min(missed, merged_bytes) if missed else 0


class FLoRA(LoRAMethod):
    name = "flora"
    reference_weights = "num_samples"
    changes_base_weights = True  # merges updates into W
    merged_export_only = "FLoRA merges every round's stacked update into the frozen weights W"
    exact = True
    alpha_per_rank = 2.0

    def initial_state(self, model: nn.Module) -> State:
        state = self.head_state(model)
        for name, layer in self.adapted_modules(model).items():
            state[base_key(name)] = layer.base.weight.detach().clone()
        state[SYNCED_KEY] = initial_sync(self.config.federation.num_clients)
        state[STACK_BYTES] = torch.zeros(1, dtype=torch.int64)
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        round_bytes = 0
        private = any(weight_update_key(layer) in u.tensors for u in updates for layer in self.ranks)
        for layer, rank in self.ranks.items():
            old = state[base_key(layer)]
            if private:  # the noised merged update is broadcast in place of the stacks (see the module docstring)
                merged_update = sum(float(w) * u.tensors[weight_update_key(layer)] for u, w in zip(updates, weights))
                round_bytes += old.numel() * old.element_size()
                for suffix in STACK_SUFFIXES:  # no client's own factors in a private state
                    new_state.pop(layer + suffix, None)
            else:
                stack_B = torch.cat([float(w) * u.tensors[factor_key(layer, "lora_B")]
                                     for u, w in zip(updates, weights)], dim=1)
                stack_A = torch.cat([u.tensors[factor_key(layer, "lora_A")] for u in updates], dim=0)
                new_state[f"{layer}/stack_A"], new_state[f"{layer}/stack_B"] = stack_A, stack_B
                round_bytes += state_bytes({"A": stack_A, "B": stack_B})
                merged_update = self.lora_scale(rank) * sum(float(w) * factor_product(u.tensors, layer)
                                                            for u, w in zip(updates, weights))
            new_state[base_key(layer)] = (old.double() + merged_update).to(old.dtype)
        new_state[STACK_BYTES] = torch.cat([state[STACK_BYTES], torch.tensor([round_bytes], dtype=torch.int64)])
        new_state[SYNCED_KEY] = mark_synced(state, updates, round_index)
        return new_state

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        head = state_bytes({k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})
        merged = state_bytes({k: v for k, v in state.items() if k.endswith("/base_weight")})
        return sum(head + catch_up_bytes(state[STACK_BYTES], synced_round(state, c), merged) for c in clients)

    # ----------------------------------------------------------------- differential privacy
    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """The task head's change and each layer's weight change s B_c A_c (the fresh LoRA started at zero)."""
        delta = super().privacy_delta(state, self.task_head_only(update))
        for layer, rank in self.ranks.items():
            delta[weight_update_key(layer)] = self.lora_scale(rank) * factor_product(update.tensors, layer)
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        task_head = self.task_head_only(update)
        private = super().with_privacy_delta(state, task_head, {k: delta[k] for k in task_head.tensors})
        return with_private_terms(update, private, delta)

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
