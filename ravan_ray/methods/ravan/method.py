"""Ravan: multi-head LoRA for federated fine-tuning (Raje et al., NeurIPS 2025, arXiv 2506.05568).

Every adapted weight gets y = W x + sum_i s_i B_i H_i A_i x with frozen bases B_i, A_i regenerated from
the run seed on every process (never sent), trainable r x r cores H_i (start at 0) and scales s_i (reset
to 1 every round). Per round (Algorithm 1): a client scores the heads (random / weight / gradient),
trains its top-K_c per layer, K_c = max(1, round(level_c * h)), and uploads s_i H_i of those heads only.
The server sets H_i to the mean of the uploads of the clients that trained head i; a head nobody trained
keeps its value. Since B_i, A_i are shared and frozen this equals the mean of the clients' updates of
each head exactly.

Choices the paper leaves open:
- aggregation weights: uniform over the head's trainers (the paper), or proportional to their sample
  counts (``method.aggregation_weights: num_samples``), renormalised over the head's trainers;
- ``scaling: constant`` (the paper's Table 5 variant) keeps s_i = 1 and trains only H_i;
- the head indices a client trained travel as metadata (a few bytes) and are not counted as uplink;
- under compute heterogeneity a head trained by only some clients is averaged over those clients only,
  so ``agg_error`` (distance to the plain mean of all sampled clients' full updates) is then non-zero by
  design; with every client training every head it is zero up to float rounding.

Under differential privacy (``ravan_ray/privacy/``):
- client level: a client's update is, per layer, the full (h, r, r) tensor s_i H_i - H_i^global on the heads it
  trained and 0 on the others (plus its task-head change), clipped jointly. The scales are part of it: s_i is
  reset to 1 every round, so a client that only moved s_i still uploads (s_i - 1) H_i, which counts towards its
  norm like any other change. A client training K_c < h heads has a delta with zeros on the other heads, so it is
  clipped less often; but the noise on head i's sum is divided by the k_i clients that trained it (the server's
  per-head mean), so heads few clients train get more noise per coordinate. A head nobody trained keeps its
  value and gets no noise (no client's data enters it). Which heads a client trained travels as metadata and is
  public: fine for ``random`` scoring (drawn from the run seed) and ``weight`` scoring (a function of the
  broadcast, already private), not for ``gradient`` scoring, which picks heads from a local batch and is refused;
- sample level: DP-SGD noises the gradient of every head's core; the noise on heads the client does not train
  is zeroed (those heads take part in the forward pass and must not move).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ravan_ray.adapters import inject
from ravan_ray.config import ConfigError, Options
from ravan_ray.methods.base import ClientTask, ClientUpdate, FederatedMethod, State, weighted_mean
from ravan_ray.methods.budget import given_budget, layer_summary, per_matrix_budget
from ravan_ray.methods.private_terms import PrivateTerms, gather_slices, noise_per_trainer, scatter_slices
from ravan_ray.methods.ravan.budget import heads_for_level, rank_from_budget
from ravan_ray.methods.ravan.layer import RavanLinear
from ravan_ray.methods.ravan.scoring import head_scores, top_k


class RavanOptions(Options):
    """How many heads, and how they are built, trained and chosen (``method.heads``, ``method.init``, ...)."""

    # the heads h: the budget matching splits N over them (r = floor(sqrt(N / h)) each)
    heads: int = Field(4, ge=1)
    init: Literal["normal", "gram_schmidt", "constant", "shared_subspace"] = "normal"
    scaling: Literal["trainable", "constant"] = "trainable"
    scoring: Literal["random", "weight", "gradient"] = "random"


class Ravan(PrivateTerms, FederatedMethod):
    name = "ravan"
    exact = True
    budget_aware = True  # a client at level l trains round(l h) heads
    # the rate the paper's protocol chose on validation for the default normal bases in each of 3 seeds of Banking77,
    # in 2 of 3 of 20 Newsgroups (0.01 in the third, 0.7 points above it on validation) and at the default run's 12
    # rounds (benchmarks/RESULTS.md, "The paper's protocol"; Gram-Schmidt bases: 0.02 on Banking77, 0.01 in 2 of 3
    # seeds of 20 Newsgroups); 0.05 collapses to chance. Validated with MiniLM: SmolLM2 wants 2e-3.
    default_lr = 2e-2
    report_tables = {"method.heads": "number of heads", "method.init": "initialisation",
                     "method.scoring": "head scoring", "method.scaling": "scaling"}
    options_model = RavanOptions
    metrics_columns = {"heads_trained": 0.0}  # the mean over the round's clients of the heads each trained per layer

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    @classmethod
    def rank(cls, method_config, d_in: int, d_out: int) -> int:
        """Each head's rank r = floor(sqrt(N / h)) under the shared budget N. A rank above d = min(d_in, d_out) adds
        nothing but memory and is refused with the largest budget that makes sense, heads of rank d (N = h d^2), and
        the budget at which the heads' total rank sqrt(N h) already reaches d (N = d^2 / h), where the paper's gains
        from more heads stop."""
        heads = method_config.options(cls.options_model).heads
        budget = per_matrix_budget(method_config, d_in, d_out)
        rank = rank_from_budget(budget, heads)
        d = min(d_in, d_out)
        if rank > d:
            saturation = math.ceil(d * d / heads)
            raise ValueError(
                f"{given_budget(method_config)} gives ravan's {heads} heads rank {rank} on a {d_out} x {d_in} matrix, "
                f"more than {d}: use method.budget <= {heads * d * d} (heads of rank {d}); the heads' total rank "
                f"already reaches {d} at sqrt(N h) = d, N = {saturation} (method.lora_rank ~ "
                f"{max(1, saturation // (d_in + d_out))})")
        return rank

    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_layer(name: str, linear: nn.Linear) -> RavanLinear:
            rank = self.rank(self.config.method, linear.in_features, linear.out_features)
            self.ranks[name] = rank
            self.shapes[name] = (linear.out_features, linear.in_features)
            return RavanLinear(linear, heads=self.options.heads, rank=rank, init=self.options.init,
                               scaling=self.options.scaling, seed=self.seed, layer_name=name)

        inject(model, self.config.model.target_modules, make_layer)
        return {name: module for name, module in model.named_modules() if isinstance(module, RavanLinear)}

    def resolved(self) -> dict:
        return {"heads": self.options.heads, "rank_per_head": dict(self.ranks),
                **layer_summary(self.config.method, self.shapes)}

    def budget_columns(self, levels: Sequence[float]) -> dict[str, list]:
        """client_budgets.csv's ``heads``: the heads K_c each client trains at its level."""
        return {"heads": [heads_for_level(level, self.options.heads) for level in levels]}

    def round_metrics(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """metrics.csv's ``heads_trained``: the mean over the round's clients of the heads each trained per layer."""
        return {"heads_trained": float(np.mean([u.meta["heads_trained"] for u in updates]))}

    # ----------------------------------------------------------------- server
    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        for name, layer in self.adapted_modules(model).items():
            state[f"{name}/cores"] = layer.cores.detach().clone()
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        for key in (k for k in state if k.endswith("/cores")):
            layer = key[: -len("/cores")]
            cores = state[key].clone()
            for head in range(cores.shape[0]):
                trainers = [(u, w) for u, w in zip(updates, weights) if head in u.meta["heads"][layer]]
                if not trainers:
                    continue  # nobody trained this head: it keeps its value
                uploads = [u.tensors[key][u.meta["heads"][layer].index(head)] for u, _ in trainers]
                head_weights = np.array([w for _, w in trainers])
                cores[head] = weighted_mean(uploads, head_weights / head_weights.sum())
            new_state[key] = cores
        return new_state

    # ----------------------------------------------------------------- differential privacy
    def check_privacy(self, mechanism) -> None:
        """Under any differential privacy the heads a client trained are public; gradient scoring picks them from a
        local batch, so it is refused."""
        super().check_privacy(mechanism)
        if self.options.scoring == "gradient":
            raise ConfigError("privacy: method.scoring=gradient picks Ravan's heads from a local batch and sends the "
                              "choice in the clear; use method.scoring=random or weight under differential privacy")

    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """Per layer the full (h, r, r) s_i H_i - H_i^global, zero on the heads the client did not train."""
        delta = super().privacy_delta(state, self.task_head_only(update))
        for layer, heads in update.meta["heads"].items():
            key = f"{layer}/cores"
            moved = update.tensors[key].double() - gather_slices(state[key], heads, 0).double()
            delta[key] = scatter_slices(moved, heads, state[key], 0)
        return delta

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        task_head = self.task_head_only(update)
        private = super().with_privacy_delta(state, task_head, {k: delta[k] for k in task_head.tensors})
        for layer, heads in update.meta["heads"].items():
            key = f"{layer}/cores"
            private.tensors[key] = (gather_slices(state[key], heads, 0).double()
                                    + gather_slices(delta[key], heads, 0)).to(update.tensors[key].dtype)
        return private

    def noise_shares(self, updates: list[ClientUpdate], noise: State) -> list[State]:
        """The task head's noise / m to every client; head i's noise / k_i to each of the k_i clients that trained it
        (the server averages head i over those), none to the others."""
        shares = [{k: v / len(updates) for k, v in noise.items() if not k.endswith("/cores")} for _ in updates]
        for key in (k for k in noise if k.endswith("/cores")):
            layer = key[: -len("/cores")]
            per_client = noise_per_trainer(noise[key], [u.meta["heads"][layer] for u in updates], axis=0)
            for share, client_noise in zip(shares, per_client):
                share[key] = client_noise
        return shares

    def after_private_noise(self, model: nn.Module) -> None:
        for layer in self.adapted_modules(model).values():
            for param in (layer.cores, layer.scales):
                if param.grad is not None:
                    keep = layer.head_mask.view(-1, *([1] * (param.dim() - 1)))
                    param.grad.mul_(keep.to(param.grad.dtype))

    def client_view(self, state: State, update: ClientUpdate) -> tuple[State, Optional[State]]:
        view = dict(state)
        view.update({k: v for k, v in update.tensors.items() if not k.endswith("/cores")})
        for layer, heads in update.meta["heads"].items():
            cores = state[f"{layer}/cores"].clone()
            cores[heads] = update.tensors[f"{layer}/cores"]
            view[f"{layer}/cores"] = cores
        return view, None

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        super().load_state(model, state, client_state)
        with torch.no_grad():
            for name, layer in self.adapted_modules(model).items():
                layer.cores.copy_(state[f"{name}/cores"])
                layer.reset_scales()
                layer.set_head_mask(range(layer.heads))  # every head live until a client selects its own

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        super().begin_training(model, task, batch_loss)
        layers = self.adapted_modules(model)
        k = heads_for_level(task.level, self.options.heads)
        scores = head_scores(self.options.scoring, layers, task.generator(stream=1), batch_loss, model)
        selected = top_k(scores, k)
        for name, layer in layers.items():
            layer.set_head_mask(selected[name])
            layer.cores.requires_grad_(True)
            layer.scales.requires_grad_(self.options.scaling == "trainable")
        return {"heads": selected, "heads_trained": k}

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            heads = meta["heads"][name]
            scaled = layer.cores.detach() * layer.scales.detach()[:, None, None]
            tensors[f"{name}/cores"] = scaled[heads].clone()
        return tensors, None
