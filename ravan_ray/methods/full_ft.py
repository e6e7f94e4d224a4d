"""Full fine-tuning with FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv 1602.05629, Algorithm 1): the upper reference (Full-FT) of the
baselines Raje et al. 2025 (arXiv 2506.05568) compare Ravan with.

Every client trains every weight of the network except the embeddings, uploads them all, and the server
takes their weighted mean. The adapted layers (the target linear layers, left as plain ``nn.Linear``)
are only what the ``agg_error`` and ``effective_rank`` diagnostics look at. FedAvg of weights is the mean
of the updates: exact.

Choices the paper leaves open:
- the embedding tables (every ``nn.Embedding``: word, position and token-type embeddings) stay frozen
  and are never sent: they are most of a small encoder's parameters (about half of MiniLM) while
  adapters of every other method leave them untouched too; everything else trains (attention, MLP,
  LayerNorms, biases, the embeddings' LayerNorm);
- the task head follows ``model.train_head`` like every method (uploaded under ``head/``); with it off
  the head stays frozen here too;
- state and uploads are the weights themselves (``full/{parameter}``), so up- and downlink are the full
  trainable model per client and round; client weights follow ``method.aggregation_weights`` (uniform when unset);
- it has no budget, so it does not read compute levels (``budget_aware`` false): under a compute mix every client
  still trains every weight.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ravan_ray.adapters import inject
from ravan_ray.methods.base import ClientTask, ClientUpdate, FederatedMethod, State, weighted_mean
from ravan_ray.methods.budget import layer_summary
from ravan_ray.methods.private_terms import PrivateTerms

PREFIX = "full/"


class FullFT(PrivateTerms, FederatedMethod):
    name = "full_ft"
    exact = True
    # All weights move, so the adapters' rates collapse it to chance. The paper's protocol chose, per seed on
    # validation, 5e-4, 5e-4 and 1e-4 on Banking77 and 2e-4, 2e-4 and 1e-4 on 20 Newsgroups: the datasets do not
    # agree on one rate. 2e-4 is the median of the six choices and never collapsed in a seed; 5e-4 is Banking77's
    # best but fell to 11 % validation accuracy in a 20NG seed, and the former default 5e-5 trails 2e-4 on both
    # (benchmarks/RESULTS.md, "The paper's protocol").
    default_lr = 2e-4
    cohort_blocker = "full fine-tuning trains a full copy of every weight per client"
    merged_export_only = "full fine-tuning changes every weight"

    def __init__(self, config):
        super().__init__(config)
        self.shapes: dict[str, tuple[int, int]] = {}

    @classmethod
    def rank(cls, method_config, d_in: int, d_out: int) -> int:
        """No budget: the update of a d_out x d_in matrix is full rank, min(d_in, d_out)."""
        return min(d_in, d_out)

    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        names = inject(model, self.config.model.target_modules, lambda name, linear: linear)  # checks the targets
        self.shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in names}
        return {name: model.get_submodule(name) for name in names}

    def resolved(self) -> dict:
        ranks = {name: self.rank(self.config.method, d_in, d_out) for name, (d_out, d_in) in self.shapes.items()}
        return {"rank": ranks, "trains": "every parameter except nn.Embedding tables",
                **layer_summary(self.config.method, self.shapes, budgeted=False)}

    def body_parameters(self, model: nn.Module) -> list[str]:
        """Every parameter outside the embedding tables and the task head (which has its own switch)."""
        embeddings = {f"{module_name}.{param}" if module_name else param
                      for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)
                      for param, _ in module.named_parameters(recurse=False)}
        head = set(getattr(model, "ravan_head_parameters", []))
        return [name for name, _ in model.named_parameters() if name not in embeddings and name not in head]

    def mutable_parameters(self, model: nn.Module) -> list[str]:
        return self.body_parameters(model) + self.head_parameter_names(model)

    # ----------------------------------------------------------------- server
    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        params = dict(model.named_parameters())
        state.update({PREFIX + name: params[name].detach().clone() for name in self.body_parameters(model)})
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for key in (k for k in state if k.startswith(PREFIX)):
            new_state[key] = weighted_mean([u.tensors[key] for u in updates], weights)
        return new_state

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.body_parameters(model):
                params[name].copy_(state[PREFIX + name])

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        meta = super().begin_training(model, task, batch_loss)
        params = dict(model.named_parameters())
        for name in self.body_parameters(model):
            params[name].requires_grad_(True)
        return meta

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        params = dict(model.named_parameters())
        tensors.update({PREFIX + name: params[name].detach().clone() for name in self.body_parameters(model)})
        return tensors, None
