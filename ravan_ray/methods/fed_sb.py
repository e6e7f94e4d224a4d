"""Fed-SB: federated LoRA-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning", 2025).

Every adapted weight gets W + B H A with B (d_out x r) and A (r x d_in) frozen and shared, and only the
r x r matrix H trained, uploaded and averaged. With B and A shared, B mean(H_c) A = mean(B H_c A): exact.
B and A come from the SVD of an approximation of the full fine-tuning update (LoRA-SB's initialisation).
The module is Ravan's layer with one head and constant scale (``RavanLinear(heads=1)`` + ``set_bases``).

Choices the paper leaves open:
- the warm-up that yields the bases is round 1 of the federation: the sampled clients fully fine-tune
  the adapted weight matrices (and the task head) for the usual S local steps and upload their
  dW_c = W_c - W0; the server averages them, dW = sum_c w_c dW_c, takes the truncated SVD
  dW ~ U_r S_r V_r^T and sets B = U_r, A = V_r^T (orthonormal, so ||B H A||_F = ||H||_F) and
  H = diag(S_r). Starting H at S_r rather than 0 keeps round 1's progress: the global model after
  round 1 is W0 + the best rank-r approximation of dW. Round 1 is therefore not exact
  (``agg_error`` = the truncation residual); every later round is;
- accounting: round 1's uplink is the full dW_c of every adapted layer (d_out d_in numbers per layer
  and client) and its downlink only the task head; the bases are sent once, to every client of the
  federation, in the round after they are computed (each client keeps them), and afterwards the
  downlink is H and the head per sampled client;
- rank r = floor(sqrt(N)) for the shared budget N, at most min(d_in, d_out) (``methods/budget.py``);
  client weights follow ``method.aggregation_weights``; the SVD is in float64.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ravan_ray.adapters import RavanLinear, inject
from ravan_ray.methods.base import ClientTask, ClientUpdate, FederatedMethod, State, state_bytes, weighted_mean
from ravan_ray.methods.budget import layer_summary, method_rank

BASES_UNSENT = "fed_sb/bases_unsent"  # 1 in the state right after the warm-up: the bases still have to go out


def core_key(layer: str) -> str:
    return f"{layer}/core"


def bases_keys(layer: str) -> tuple[str, str]:
    return f"{layer}/bases_B", f"{layer}/bases_A"


def warmup_key(layer: str) -> str:
    return f"{layer}/delta"


class FedSB(FederatedMethod):
    name = "fed_sb"
    exact = True

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self._warmup = True  # set by load_state: the global state has no bases yet
        self._start: dict[str, torch.Tensor] = {}  # a warm-up client's weights before training

    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_layer(name: str, linear: nn.Linear) -> RavanLinear:
            rank = method_rank(self.config.method, linear.in_features, linear.out_features)
            self.ranks[name] = rank
            self.shapes[name] = (linear.out_features, linear.in_features)
            # The bases drawn here are placeholders until the warm-up's SVD replaces them; H stays 0 until then.
            return RavanLinear(linear, heads=1, rank=rank, scaling="constant", seed=self.seed, layer_name=name)

        inject(model, self.config.model.target_modules, make_layer)
        return {name: module for name, module in model.named_modules() if isinstance(module, RavanLinear)}

    def resolved(self) -> dict:
        return {"rank": dict(self.ranks), **layer_summary(self.config.method, self.shapes)}

    # ----------------------------------------------------------------- server
    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        warmup = warmup_key(next(iter(self.ranks))) in updates[0].tensors
        for layer, rank in self.ranks.items():
            if warmup:
                delta = weighted_mean([u.tensors[warmup_key(layer)].double() for u in updates], weights)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                dtype = updates[0].tensors[warmup_key(layer)].dtype
                b_key, a_key = bases_keys(layer)
                new_state[b_key], new_state[a_key] = U[:, :rank].to(dtype), Vh[:rank].to(dtype)
                new_state[core_key(layer)] = torch.diag(S[:rank]).to(dtype)
            else:
                new_state[core_key(layer)] = weighted_mean([u.tensors[core_key(layer)] for u in updates], weights)
        new_state[BASES_UNSENT] = torch.tensor([1 if warmup else 0], dtype=torch.uint8)
        return new_state

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        bases = {k: v for k, v in state.items() if k.endswith(("/bases_B", "/bases_A"))}
        per_client = {k: v for k, v in state.items() if k not in bases and k != BASES_UNSENT}
        once = state_bytes(bases) * self.config.federation.num_clients if int(state.get(BASES_UNSENT, [0])[0]) else 0
        return state_bytes(per_client) * len(clients) + once

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        layers = self.adapted_modules(model)
        self._warmup = bases_keys(next(iter(layers)))[0] not in state
        with torch.no_grad():
            for name, layer in layers.items():
                if warmup_key(name) in state:  # a warm-up client's model (the agg_error diagnostic)
                    layer.base.weight += state[warmup_key(name)].to(layer.base.weight.dtype)
                if not self._warmup:
                    B, A = (state[key] for key in bases_keys(name))
                    layer.set_bases(B.unsqueeze(0), A.unsqueeze(0))
                    layer.cores.copy_(state[core_key(name)].unsqueeze(0))

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        layers = self.adapted_modules(model)
        if self._warmup:
            self._start = {name: layer.base.weight.detach().clone() for name, layer in layers.items()}
        for layer in layers.values():
            (layer.base.weight if self._warmup else layer.cores).requires_grad_(True)
        return {**meta, "warmup": self._warmup}

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            if meta["warmup"]:
                tensors[warmup_key(name)] = layer.base.weight.detach() - self._start[name]
            else:
                tensors[core_key(name)] = layer.cores.detach()[0].clone()
        return tensors, None
