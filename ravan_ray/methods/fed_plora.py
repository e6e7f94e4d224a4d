"""Fed-PLoRA: heterogeneous federated fine-tuning with parallel one-rank adaptation (Zhang, Hu, Xu,
"Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation", ICLR 2026, arXiv 2602.16936).

PLoRA writes a rank-R LoRA as R parallel one-rank modules, dW = s sum_{j=1..R} b_j a_j (b_j a column of B,
a_j a row of A; the same function as LoRA). A client whose compute allows rank r_i < R trains only r_i of the
modules, chosen by Select-N-Fold: it selects r_i modules and folds the other R - r_i into its frozen weight,
W_i = W + s sum_{j not selected} b_j a_j, before local training. Its model at the start of the round is
therefore exactly the global model, whatever r_i (the paper's "zero initialisation noise", where HetLoRA's
truncation drops the ranks beyond r_i and FlexLoRA's redistribution drops what lies beyond the SVD
truncation). It trains its r_i modules and uploads them; the server aggregates module by module.

Choices the paper leaves open (its code, github.com/TNI-playground/Fed-PLoRA, was not available here):
- selection: r_i modules drawn uniformly without replacement from the client's private round RNG, one draw
  per adapted layer; r_i = ``budgets.rank_for_level`` of the client's level and R = r_L, the LoRA rank of the
  shared budget (the rank-heterogeneous methods' convention, ``methods/budget.py``);
- aggregation: module j becomes the weighted mean (``method.aggregation_weights``, uniform when unset;
  renormalised) of the b_j and of the a_j uploaded by the clients that trained it; a module nobody trained keeps
  its value. Averaging b and a separately is not averaging b a, so this is not exact (``agg_error`` > 0, as
  FedIT's); the paper bounds this aggregation noise rather than removing it;
- scaling alpha / R with alpha = R by default (scale 1, PEFT's ``lora_alpha=8`` at rank 8), the same for every
  client and for the folded modules;
- initialisation: B = 0 and A the platform's seeded N(0, 1/d_in), the same on every client (a fresh LoRA);
- client-level DP (``privacy.mode: client``), as Ravan's heads: a client's update is, per layer, the full-size
  (B, A) change with the modules it trained at b_j - b_j^global, a_j - a_j^global and zeros at the others, clipped
  jointly; module j's noise is divided among the k_j clients that trained it (the server's per-module mean),
  a module nobody trained keeps its value and gets none. Which modules a client trained is drawn from the run
  seed (public). The fold is the client's own arithmetic on the broadcast and needs nothing private;
- bytes: the uplink is the r_i selected modules (r_i (d_in + d_out) numbers per layer; the module indices are
  metadata, not counted, like Ravan's head indices); the downlink is all R modules to every sampled client.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ravan_ray.methods.base import HEAD_PREFIX, ClientTask, ClientUpdate, State, weighted_mean
from ravan_ray.methods.lora import LoRAMethod, RankLevels, factor_key
from ravan_ray.methods.private_terms import gather_slices, noise_per_trainer, scatter_slices

SELECT_STREAM = 5  # ClientTask.generator stream for the module selection (0-4 and 6 are used elsewhere)


def fold(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, modules: list[int], scale: float) -> torch.Tensor:
    """W + scale sum_{j in modules} b_j a_j (Select-N-Fold's folding of the modules a client does not train)."""
    if not modules:
        return weight
    index = torch.tensor(modules, dtype=torch.long)
    return weight + scale * (B[:, index] @ A[index]).to(weight.dtype)


class FedPLoRA(RankLevels, LoRAMethod):
    name = "fed_plora"
    exact = False
    changes_base_weights = True  # Select-N-Fold folds the unselected modules into W
    alpha_per_rank = 1.0

    def resolved(self) -> dict:
        return {**super().resolved(), "client_rank_by_level": self.client_ranks_by_level()}

    # ----------------------------------------------------------------- server
    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for layer, rank in self.ranks.items():
            b_key, a_key = factor_key(layer, "lora_B"), factor_key(layer, "lora_A")
            B, A = state[b_key].clone(), state[a_key].clone()
            for module in range(rank):
                trainers = [(u, w, u.meta["modules"][layer].index(module)) for u, w in zip(updates, weights)
                            if module in u.meta["modules"][layer]]
                if not trainers:
                    continue  # nobody trained this module: it keeps its value
                p = np.array([w for _, w, _ in trainers])
                p = p / p.sum()
                B[:, module] = weighted_mean([u.tensors[b_key][:, i] for u, _, i in trainers], p)
                A[module] = weighted_mean([u.tensors[a_key][i] for u, _, i in trainers], p)
            new_state[b_key], new_state[a_key] = B, A
        return new_state

    # ----------------------------------------------------------------- differential privacy
    #: the rank axis of each factor: B's modules are its columns, A's its rows
    RANK_AXIS = {"lora_B": 1, "lora_A": 0}

    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """Per layer the full-size B and A changes: trained modules minus their global values, zero elsewhere."""
        delta = super().privacy_delta(state, self.task_head_only(update))
        for layer, modules in update.meta["modules"].items():
            for factor, axis in self.RANK_AXIS.items():
                key = factor_key(layer, factor)
                moved = update.tensors[key].double() - gather_slices(state[key], modules, axis).double()
                delta[key] = scatter_slices(moved, modules, state[key], axis)
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        task_head = self.task_head_only(update)
        tensors = super().with_privacy_delta(state, task_head, {k: delta[k] for k in task_head.tensors}).tensors
        for layer, modules in update.meta["modules"].items():
            for factor, axis in self.RANK_AXIS.items():
                key = factor_key(layer, factor)
                tensors[key] = (gather_slices(state[key], modules, axis).double()
                                + gather_slices(delta[key], modules, axis)).to(update.tensors[key].dtype)
        return replace(update, tensors=tensors)

    def noise_shares(self, updates: list[ClientUpdate], noise: State) -> list[State]:
        """The task head's noise / m to every client; module j's noise / k_j to each of its k_j trainers."""
        shares = [{k: v / len(updates) for k, v in noise.items() if k.startswith(HEAD_PREFIX)} for _ in updates]
        for layer in self.ranks:
            trained = [u.meta["modules"][layer] for u in updates]
            for factor, axis in self.RANK_AXIS.items():
                key = factor_key(layer, factor)
                for share, client_noise in zip(shares, noise_per_trainer(noise[key], trained, axis)):
                    share[key] = client_noise
        return shares

    def client_view(self, state: State, update: ClientUpdate) -> tuple[State, Optional[State]]:
        """The client's model after training: the global modules with its own trained ones in their places."""
        view = {**state, **{k: v for k, v in update.tensors.items() if not k.endswith(("/lora_A", "/lora_B"))}}
        for layer, modules in update.meta["modules"].items():
            b_key, a_key = factor_key(layer, "lora_B"), factor_key(layer, "lora_A")
            B, A = state[b_key].clone(), state[a_key].clone()
            B[:, modules], A[modules] = update.tensors[b_key], update.tensors[a_key]
            view[b_key], view[a_key] = B, A
        return view, None

    # ----------------------------------------------------------------- client
    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        """Select r_i modules per layer, fold the rest into the frozen weight, train the selected ones."""
        meta = super().begin_training(model, task, batch_loss)
        generator = task.generator(stream=SELECT_STREAM)
        selected = {}
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                r_i = self.client_rank(task.level, name)
                chosen = sorted(torch.randperm(layer.rank, generator=generator)[:r_i].tolist())
                folded = [j for j in range(layer.rank) if j not in chosen]
                layer.base.weight.copy_(fold(layer.base.weight, layer.lora_B, layer.lora_A, folded, layer.scale))
                layer.set_rank_mask(chosen)  # the folded modules now act through W only
                selected[name] = chosen
        return {**meta, "modules": selected}

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            chosen = torch.tensor(meta["modules"][name], dtype=torch.long)
            tensors[factor_key(name, "lora_B")] = layer.lora_B.detach()[:, chosen].clone()
            tensors[factor_key(name, "lora_A")] = layer.lora_A.detach()[chosen].clone()
        return tensors, None
