"""RoLoRA: federated LoRA by alternating optimisation of its two factors (Chen et al., "Robust Federated
Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025, arXiv 2502.01755).

In each round the clients train one factor of the shared LoRA while the other is frozen and shared, and the
server averages the trained factor; the next round swaps the roles. With the frozen factor identical on every
client the average is exact,

    mean(B_c) A = mean(B_c A)    (a B round),      B mean(A_c) = mean(B A_c)    (an A round),

unlike FedIT's mean(B_c) mean(A_c); and unlike FFA-LoRA both factors are learnt, so the adapter is not stuck in
the random row space of its initial A. Each round a client uploads one factor, half a LoRA.

Choices the paper leaves open:
- the order: B rounds are the odd rounds (1, 3, ...), A rounds the even ones. B starts at 0 (PEFT's
  initialisation), and with B = 0 the gradient of the loss with respect to A is B^T (...) = 0, so an A round
  first would not move anything;
- one factor per communication round: the paper's iteration updates both factors with a server average after
  each, i.e. two of the platform's rounds; ``federation.rounds`` counts communication rounds as for every
  method;
- rank r = r_L, the LoRA rank of the shared budget: the adapter has N = r (d_in + d_out) numbers, half of them
  trained in any one round; A starts as the platform's seeded N(0, 1/d_in) draw, the same on every client;
- scaling alpha / r with alpha = r by default (scale 1): no RoLoRA code is public, and this is PEFT's default at
  the default rank 8 (``lora_alpha=8``);
- downlink: a client that took part in the previous round needs only the factor that round trained; one that
  has missed two rounds or more needs both (the state's current A and B), and in round 1 every client already
  holds the seeded initial factors, so only the task head is sent. The server tracks, under ``eval/``, the
  round each client last synchronised to;
- client weights follow ``method.aggregation_weights`` (uniform by default).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ravan_ray.methods.base import (EVAL_PREFIX, HEAD_PREFIX, SYNCED_KEY, ClientTask, ClientUpdate, State,
                                    initial_sync, mark_synced, state_bytes, synced_round, weighted_mean)
from ravan_ray.methods.lora import LoRAMethod, factor_key

LAST_ROUND = EVAL_PREFIX + "rolora/round"  # the last aggregated round (0 before any)


def trained_factor(round_index: int) -> str:
    """The factor RoLoRA trains in this round: B in odd rounds, A in even ones."""
    return "lora_B" if round_index % 2 == 1 else "lora_A"


class RoLoRA(LoRAMethod):
    name = "rolora"
    exact = True
    alpha_per_rank = 1.0

    # ----------------------------------------------------------------- server
    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        state[SYNCED_KEY] = initial_sync(self.config.federation.num_clients)
        state[LAST_ROUND] = torch.zeros(1, dtype=torch.int64)
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        factor = trained_factor(round_index)
        for layer in self.ranks:
            key = factor_key(layer, factor)
            new_state[key] = weighted_mean([u.tensors[key] for u in updates], weights)
        new_state[SYNCED_KEY] = mark_synced(state, updates, round_index)
        new_state[LAST_ROUND] = torch.tensor([round_index], dtype=torch.int64)
        return new_state

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        last = int(state[LAST_ROUND][0])
        head = state_bytes({k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})

        def factors(which: tuple[str, ...]) -> int:
            return state_bytes({k: v for k, v in state.items()
                                if not k.startswith(EVAL_PREFIX) and k.rsplit("/", 1)[-1] in which})

        def needs(client: int) -> int:
            missed = last - synced_round(state, client)  # rounds aggregated since the client's state
            if missed <= 0:
                return 0
            return factors((trained_factor(last),)) if missed == 1 else factors(("lora_A", "lora_B"))

        return sum(head + needs(c) for c in clients)

    # ----------------------------------------------------------------- client
    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        frozen = "lora_A" if trained_factor(task.round) == "lora_B" else "lora_B"
        for layer in self.adapted_modules(model).values():
            getattr(layer, frozen).requires_grad_(False)
        return meta

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        frozen = "/lora_A" if trained_factor(task.round) == "lora_B" else "/lora_B"
        return {k: v for k, v in tensors.items() if not k.endswith(frozen)}, None
