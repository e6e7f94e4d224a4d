"""Shared plumbing of the LoRA baselines (FedIT, FedEx-LoRA, FFA-LoRA, FLoRA, FedSA-LoRA, HetLoRA, FlexLoRA,
FedSVD, RoLoRA, Fed-PLoRA).

Every target ``nn.Linear`` W becomes ``LoRALinear``: y = W x + (alpha / r) B A x with B (d_out x r) starting at 0
and A (r x d_in) drawn N(0, 1/d_in) from (run seed, layer name), i.e. the same A on every client. The rank r comes
from the shared per-matrix budget (``methods/budget.py``).

Choices common to all LoRA baselines:
- scaling has PEFT's meaning, alpha / r. ``method.lora_alpha`` sets alpha; unset, each method uses what its
  original code uses, written ``alpha_per_rank`` (alpha = alpha_per_rank x r, so the scale is alpha_per_rank)
  and sourced in the method's docstring. Rank-heterogeneous methods (HetLoRA, FlexLoRA) build each client's
  LoRA like their code builds a PEFT LoraConfig per client: with that client's rank r_c, so its scale is
  alpha / r_c (equal for every client under the default alpha = alpha_per_rank x r_c);
- A's rows have unit expected norm (N(0, 1/d_in)), like Ravan's frozen bases, rather than PEFT's
  Kaiming-uniform A (rows of norm ~ 1/sqrt(3)); this changes what one learning rate does, not the method;
- global-state keys are ``{layer}/lora_A`` and ``{layer}/lora_B``; a method lists in ``shared_factors`` which
  of the two it broadcasts and uploads, and in ``trained_factors`` which its clients train.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from ravan_ray.adapters import LoRALinear, inject
from ravan_ray.budgets import rank_for_level
from ravan_ray.methods.base import (EVAL_PREFIX, ClientTask, ClientUpdate, FederatedMethod, State,
                                    weighted_mean)
from ravan_ray.methods.budget import LORA_RANK, layer_summary
from ravan_ray.methods.private_terms import PrivateTerms

FACTORS = ("lora_A", "lora_B")


def factor_key(layer: str, factor: str) -> str:
    return f"{layer}/{factor}"


def weight_update_key(layer: str) -> str:
    """Under client-level DP, where a server rule needs each client's product B_c A_c (FedEx-LoRA, FLoRA, FlexLoRA):
    the key of the client's clipped, noised change of its effective weight, s (B_c A_c - its start), which the
    private upload carries in place of a product the server would form from the factors."""
    return f"{layer}/weight_update"


def factor_product(tensors: State, layer: str) -> torch.Tensor:
    """B A of one layer's factors in ``tensors``, in float64."""
    return tensors[factor_key(layer, "lora_B")].double() @ tensors[factor_key(layer, "lora_A")].double()


class LoRAMethod(PrivateTerms, FederatedMethod):
    """LoRA on the target layers; clients train and upload ``shared_factors``; subclasses aggregate."""

    #: the factors that are broadcast, trained and uploaded (FFA-LoRA: B only; FedSA-LoRA: A only)
    shared_factors: ClassVar[tuple[str, ...]] = FACTORS
    #: the factors the client trains (FedSA-LoRA also trains its private B)
    trained_factors: ClassVar[tuple[str, ...]] = FACTORS
    #: lora_alpha / r when ``method.lora_alpha`` is unset: the original code's alpha divided by its rank
    alpha_per_rank: ClassVar[float] = 1.0
    rank_rule = LORA_RANK  # B and A train: r = floor(N / (d_in + d_out))

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def lora_scale(self, rank: int) -> float:
        """alpha / rank (PEFT's scaling) for a LoRA of this rank."""
        alpha = self.config.method.lora_alpha
        return (self.alpha_per_rank if alpha is None else float(alpha) / rank)

    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_layer(name: str, linear: nn.Linear) -> LoRALinear:
            rank = self.rank(self.config.method, linear.in_features, linear.out_features)
            self.ranks[name] = rank
            self.shapes[name] = (linear.out_features, linear.in_features)
            return LoRALinear(linear, rank, seed=self.seed, layer_name=name, scale=self.lora_scale(rank),
                              train_A="lora_A" in self.trained_factors, train_B="lora_B" in self.trained_factors)

        inject(model, self.config.model.target_modules, make_layer)
        return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}

    def resolved(self) -> dict:
        alpha = self.config.method.lora_alpha
        return {"rank": dict(self.ranks), "lora_scale": {name: self.lora_scale(r) for name, r in self.ranks.items()},
                "lora_alpha": "alpha_per_rank x r" if alpha is None else alpha,
                **layer_summary(self.config.method, self.shapes)}

    # ----------------------------------------------------------------- server
    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        for name, layer in self.adapted_modules(model).items():
            for factor in self.shared_factors:
                state[factor_key(name, factor)] = getattr(layer, factor).detach().clone()
        return state

    def average_factors(self, state: State, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """The new state with the head and every shared factor replaced by the clients' weighted mean."""
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for key in self.factor_keys(state):
            new_state[key] = weighted_mean([u.tensors[key] for u in updates], weights)
        return new_state

    def factor_keys(self, state: State) -> list[str]:
        return [k for k in state if not k.startswith(EVAL_PREFIX) and k.rsplit("/", 1)[-1] in self.shared_factors]

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                layer.set_rank_mask(layer.rank)  # a previous client may have masked ranks in this process
                layer.scale = self.lora_scale(layer.rank)  # ... or used its own rank's scale
                for factor in FACTORS:
                    key = factor_key(name, factor)
                    if key in state:
                        getattr(layer, factor).copy_(state[key])

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        for layer in self.adapted_modules(model).values():
            for factor in self.trained_factors:
                getattr(layer, factor).requires_grad_(True)
        return meta

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            for factor in self.shared_factors:
                tensors[factor_key(name, factor)] = getattr(layer, factor).detach().clone()
        return tensors, None


def pad_rank(factor: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """Zero-pad a LoRA factor along its rank axis (B: axis 1, A: axis 0) to ``rank``."""
    missing = rank - factor.shape[axis]
    if missing <= 0:
        return factor
    shape = list(factor.shape)
    shape[axis] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=axis)


class RankLevels:
    """Clients' ranks from their compute level: r_c = rank_for_level(l_c, r_max) = round(l_c r_max), at least 1
    (HetLoRA, FlexLoRA, Fed-PLoRA)."""

    budget_aware = True
    ranks: dict[str, int]
    config: object

    def client_rank(self, level: float, layer: str) -> int:
        return rank_for_level(level, self.ranks[layer])

    def client_ranks_by_level(self) -> dict:
        by_level = {}
        for level in self.config.compute.levels:
            ranks = {layer: self.client_rank(level, layer) for layer in self.ranks}
            values = set(ranks.values())
            by_level[float(level)] = values.pop() if len(values) == 1 else ranks
        return by_level


class HeterogeneousRankLoRA(RankLevels, LoRAMethod):
    """Client side shared by HetLoRA and FlexLoRA: compute heterogeneity through the LoRA rank.

    The global LoRA has rank r_max (the budget's LoRA rank); a client at budget level l_c uses
    r_c = rank_for_level(l_c, r_max) = round(l_c r_max), at least 1 (HetLoRA may prune it further). It keeps the
    first r_c ranks of the broadcast factors (the ranks beyond are masked and zeroed: the client runs a rank-r_c
    LoRA with its own scale alpha / r_c), trains them and uploads B[:, :r_c] and A[:r_c] only. The server
    broadcasts the r_max factors once per round and every client truncates them itself, so downlink is
    r_max-sized for every client (sending each client only its r_c ranks would cost r_c / r_max of that).
    """

    def resolved(self) -> dict:
        return {**super().resolved(), "client_rank_by_level": self.client_ranks_by_level()}

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        ranks = {}
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                rank = self.client_rank(task.level, name)
                layer.set_rank_mask(rank)
                layer.scale = self.lora_scale(rank)
                layer.lora_B[:, rank:] = 0
                layer.lora_A[rank:] = 0
                ranks[name] = rank
        return {**meta, "rank": ranks}

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            rank = meta["rank"][name]
            tensors[factor_key(name, "lora_B")] = layer.lora_B.detach()[:, :rank].clone()
            tensors[factor_key(name, "lora_A")] = layer.lora_A.detach()[:rank].clone()
        return tensors, None

    def uploaded_rank(self, update: ClientUpdate, layer: str) -> int:
        return update.tensors[factor_key(layer, "lora_A")].shape[0]

    def client_delta(self, update: ClientUpdate, layer: str) -> torch.Tensor:
        """The client's update (alpha / r_c) B_c A_c of one layer, in float64."""
        B, A = (update.tensors[factor_key(layer, f)].double() for f in ("lora_B", "lora_A"))
        return self.lora_scale(self.uploaded_rank(update, layer)) * (B @ A)

    def padded_factors(self, update: ClientUpdate, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's (B, A) zero-padded to r_max: the rank-r_c LoRA it trained, in the global shape."""
        rank = self.ranks[layer]
        return (pad_rank(update.tensors[factor_key(layer, "lora_B")], rank, axis=1),
                pad_rank(update.tensors[factor_key(layer, "lora_A")], rank, axis=0))

    def client_view(self, state: State, update: ClientUpdate) -> tuple[State, Optional[State]]:
        view, _ = super().client_view(state, update)
        for layer in self.ranks:
            B, A = self.padded_factors(update, layer)
            # the view is loaded at the global scale alpha / r_max; the client applied alpha / r_c
            ratio = self.lora_scale(self.uploaded_rank(update, layer)) / self.lora_scale(self.ranks[layer])
            view[factor_key(layer, "lora_B")], view[factor_key(layer, "lora_A")] = B * ratio, A
        return view, None
