"""FedSA-LoRA: share A, keep B local (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025).

A learns what is general across clients and B what is client specific: every client trains both, uploads
A only, and keeps its own B for its next round (the client state; the platform keeps it between the rounds
a client takes part in and checkpoints it). The server averages A.

The task head: FedSA-LoRA's GLUE configuration keeps the classifier local too (``personalization.local_param:
['vera_lambda_b', 'classifier']`` in ``federatedscope/glue/yamls/fedsa-lora.yaml``), so by default
(``method.fedsa_local_head: true``) the head is trained, kept in the client state with B, and neither uploaded
nor broadcast; a client's first round starts from the seeded initial head every process builds.
``fedsa_local_head: false`` shares and averages the head like every other method.

Choices the paper leaves open:
- a client's first round starts from B = 0 (the usual LoRA initialisation), whatever the others learnt;
- the global model, which the paper does not need (it evaluates each client on its own data), is
  B_eval A with B_eval the weighted mean of the B's of this round's clients, each as it was after its
  local training (and, with a local head, the head the same mean of their heads); these are kept under
  ``eval/`` (the server's only, never broadcast, not downlink). The clients' B (and heads) reach the server
  with the updates for this diagnostic only: they are not uplink and no aggregation rule reads them;
- ``agg_error`` compares B_eval mean(A) with mean(B_c A_c), so it is not zero: FedSA-LoRA personalises
  rather than aggregates exactly;
- rank r = r_L from the shared budget (B trains too, only it stays local); scaling alpha / r with alpha = 2 r
  by default (scale 2), as the same config (``r: 8, lora_alpha: 16``); client weights follow
  ``method.aggregation_weights`` (uniform when unset);
- under client-level DP (``privacy.mode: client``) the shared A (and a shared head) is clipped and noised like any
  upload; the local B's never leave a real client, so the global model's B_eval, a simulation diagnostic built
  from them, is not private, and neither are the test metrics computed with it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ravan_ray.config import Options
from ravan_ray.methods.base import EVAL_PREFIX, HEAD_PREFIX, ClientTask, ClientUpdate, State, weighted_mean
from ravan_ray.methods.lora import LoRAMethod, factor_key


class FedSALoRAOptions(Options):
    # Keep the task head on the client like B (its GLUE configs), or share and average it.
    fedsa_local_head: bool = True


class FedSALoRA(LoRAMethod):
    name = "fedsa_lora"
    exact = False
    shared_factors = ("lora_A",)
    trained_factors = ("lora_A", "lora_B")
    alpha_per_rank = 2.0
    options_model = FedSALoRAOptions

    @property
    def local_head(self) -> bool:
        return self.options.fedsa_local_head

    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        if self.local_head:  # every client starts from the seeded head it already has
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = self.average_factors(state, updates, weights)
        for key in updates[0].client_state:  # the global model's B (and local head) for evaluation only
            new_state[EVAL_PREFIX + key] = weighted_mean([u.client_state[key] for u in updates], weights)
        return new_state

    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        """The shared A; B (and a local head) are the client's own (none yet: B = 0 and the seeded head), or the
        eval means for the global model (only the server holds ``eval/`` keys)."""
        own = client_state if client_state is not None else {
            k[len(EVAL_PREFIX):]: v for k, v in state.items() if k.startswith(EVAL_PREFIX)}
        if self.local_head:
            state = {**state, **{k: v for k, v in own.items() if k.startswith(HEAD_PREFIX)}}
            if not any(k.startswith(HEAD_PREFIX) for k in state):  # a first-time client: the seeded head stays
                state = {**state, **self.head_state(model)}
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                key = factor_key(name, "lora_B")
                if key in own:
                    layer.lora_B.copy_(own[key])

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        local = {factor_key(name, "lora_B"): layer.lora_B.detach().clone()
                 for name, layer in self.adapted_modules(model).items()}
        if self.local_head:
            local.update({k: tensors.pop(k) for k in list(tensors) if k.startswith(HEAD_PREFIX)})
        return tensors, local
