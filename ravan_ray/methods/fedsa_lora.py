"""FedSA-LoRA: share A, keep B local (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025).

A learns what is general across clients and B what is client specific: every client trains both, uploads
A only, and keeps its own B for its next round (the client state; the platform keeps it between the rounds
a client takes part in and checkpoints it). The server averages A.

Choices the paper leaves open:
- a client's first round starts from B = 0 (the usual LoRA initialisation), whatever the others learnt;
- the global model, which the paper does not need (it evaluates each client on its own data), is
  B_eval A with B_eval the weighted mean of the B's of this round's clients, each as it was after its
  local training; B_eval is kept under ``eval/`` (the server's only, never broadcast, not downlink). The
  clients' B reach the server with the updates for this diagnostic only: they are not uplink and no
  aggregation rule reads them;
- ``agg_error`` compares B_eval mean(A) with mean(B_c A_c), so it is not zero: FedSA-LoRA personalises
  rather than aggregates exactly;
- rank r = r_L from the shared budget (B trains too, only it stays local); no alpha / r scaling; client
  weights follow ``method.aggregation_weights``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ravan_ray.methods.base import EVAL_PREFIX, ClientTask, ClientUpdate, State, weighted_mean
from ravan_ray.methods.lora import LoRAMethod, factor_key


def eval_b_key(layer: str) -> str:
    return EVAL_PREFIX + factor_key(layer, "lora_B")


class FedSALoRA(LoRAMethod):
    name = "fedsa_lora"
    exact = False
    shared_factors = ("lora_A",)
    trained_factors = ("lora_A", "lora_B")

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = self.average_factors(state, updates, weights)
        for layer in self.ranks:
            local = [u.client_state[factor_key(layer, "lora_B")] for u in updates]
            new_state[eval_b_key(layer)] = weighted_mean(local, weights)
        return new_state

    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        """The shared A; B is the client's own (none yet: B = 0), or B_eval for the global model (only the
        server holds ``eval/`` keys)."""
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                key = factor_key(name, "lora_B")
                if client_state is not None:
                    layer.lora_B.copy_(client_state[key])
                elif eval_b_key(name) in state:
                    layer.lora_B.copy_(state[eval_b_key(name)])

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        local = {factor_key(name, "lora_B"): layer.lora_B.detach().clone()
                 for name, layer in self.adapted_modules(model).items()}
        return tensors, local
