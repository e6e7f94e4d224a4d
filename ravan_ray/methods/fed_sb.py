"""Fed-SB: federated LoRA-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning", 2025, arXiv 2502.15436; the initialisation is
LoRA-SB's, Ponkshe et al., "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning", arXiv 2411.19557).

Every adapted weight gets W + s B R A with B (d_out x r) and A (r x d_in) frozen and shared, and only the
r x r matrix R trained, uploaded and averaged. With B and A shared, B mean(R_c) A = mean(B R_c A): exact.
The module is the frozen-bases layer with one head and constant scale (``FrozenBasesLinear(heads=1)``, whose
placeholder bases ``set_bases`` replaces), the layer Ravan's heads are made of.

The initialisation, as the reference code does it (fed-sb ``utils/gradient_utils.py``
``estimate_and_process_grads_torch``, ``utils/initialization_utils.py`` ``find_and_initialize_grad``):
gradients of the adapted weights W are summed over a few mini-batches with no weight step, the update is
estimated as dW = -eta sign(sum of gradients) (the first step of sign/Adam descent), and its truncated SVD
dW ~ U_r S_r V_r^T gives B = U_r, A = V_r^T, R = S_r; W itself is unchanged, so the model after the
initialisation is W + U_r S_r V_r^T. The step eta is the first step of a linear warm-up: the learning rate over
the warm-up steps, eta = lr / (warmup_ratio x total training steps) (fed-sb ``fed/CR/train_cr_fed.py``:
``eff_lr = args.lr/(args.warmup_ratio * total_training_steps)`` with ``total_training_steps =
len(train_loader) * args.epochs``, the pooled training set's mini-batches times the clients' epochs, and
``--warmup_ratio 0.02`` in ``fed/scripts/cr.sh``; LoRA-SB's ``train_glue.py`` does the same with 0.06). The
code estimates once, on 170 samples of the pooled training set, before the federation starts; a federation has
no pooled data, and a sum of gradients is additive, so here the clients sampled in round 1 each sum their
gradients over their own batches and the server sums the sums: the same estimate as the code's on the union of
their batches. Round 1 is therefore the estimation round: its clients run their S local mini-batches with
learning rate 0 (no weight moves, not even the task head), accumulate the gradients of every adapted W and upload
those sums (d_out x d_in numbers per adapted layer: that is round 1's uplink); the server forms dW, its SVD and the
state. From round 2 on every sampled client
trains R (and the head) and the server averages them.

Choices the paper and code leave open:
- the estimate's size: S mini-batches of ``federation.batch_size`` from each round-1 client (3 x 10 x 16 = 480
  samples at the benchmarks' scale, against the code's 170);
- the step eta (:meth:`FedSB.initial_step`): the clients' learning rate over ``method.fed_sb_warmup_ratio``
  (0.02, fed-sb's) times the run's total training steps, counted as the code counts them, every mini-batch the
  clients train on over the whole run together: rounds x clients_per_round x local_steps (8 x 3 x 10 = 240 at
  the benchmarks' scale: eta = lr / 4.8). The platform's optimiser itself has no warm-up; the ratio only sizes
  the initial update. A warm-up shorter than one step is no warm-up: eta is at most lr;
- the SVD is exact (float64 ``torch.linalg.svd``) where the code uses ``torch.svd_lowrank(q=r, niter=10)``, a
  randomised approximation of the same truncation; the gradient sums are added with equal weight whatever
  ``method.aggregation_weights`` says, as pooling the samples does;
- scaling: the code sets lora_alpha = r (scale 1); with ``method.lora_alpha`` set the layer applies
  s = alpha / r and R starts at S_r / s, so the initial model is W + U_r S_r V_r^T for any alpha;
- accounting: round 1's downlink is the task head; the bases B, A are sent to a client the first time it is
  sampled after they exist (the server tracks, under ``eval/``, which clients hold them), then only R and
  the head per sampled client. ``agg_error`` of round 1 is not defined (NaN): no client trained, so there is
  no mean of client updates to compare the initialisation with; every later round is exact;
- under differential privacy: in client mode round 1's gradient sums are that round's updates (relative to zero),
  clipped and noised like any other (their scale differs from R's, so a clip norm chosen for R clips them hard:
  the sign and the SVD then see a rescaled sum; adaptive clipping recovers from round 2 on); in sample mode
  round 1 sums the gradients DP-SGD clipped and noised, so the bases are private as well;
- rank r = floor(sqrt(N)) for the shared budget N, at most min(d_in, d_out) (``methods/budget.py``); client
  weights for R follow ``method.aggregation_weights``; unset, uniform, as the code's plain mean of the R's
  (``fed/CR/multiround_train_cr_fed.py``: ``torch.stack(...).mean(0)``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from ravan_ray.adapters import FrozenBasesLinear, adapter_dtype, gaussian_bases, inject, layer_generator
from ravan_ray.config import Options
from ravan_ray.methods.base import (HEAD_PREFIX, SYNCED_KEY, ClientTask, ClientUpdate, FederatedMethod, State,
                                    initial_sync, mark_synced, state_bytes, synced_round, weighted_mean)
from ravan_ray.methods.budget import CORE, layer_summary
from ravan_ray.methods.private_terms import PrivateTerms

INIT_ROUND = 1  # the round whose clients estimate the update; its aggregation creates the bases


def core_key(layer: str) -> str:
    return f"{layer}/core"


def bases_keys(layer: str) -> tuple[str, str]:
    return f"{layer}/bases_B", f"{layer}/bases_A"


def grad_key(layer: str) -> str:
    return f"{layer}/grad_sum"


def sign_update_bases(grad_sum: torch.Tensor, step: float,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB's initialisation from a gradient sum: dW = -step sign(grad_sum) ~ U_r S_r V_r^T; returns
    (B = U_r, A = V_r^T, S_r) in float64."""
    update = -step * torch.sign(grad_sum.double())
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    return U[:, :rank], Vh[:rank], S[:rank]


def accumulate_into(total: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A gradient hook that adds every gradient it sees to ``total`` and leaves the gradient itself unchanged."""
    def hook(grad: torch.Tensor) -> None:
        total.add_(grad.detach().to(total.dtype))
    return hook


class FedSBOptions(Options):
    # The warm-up ratio whose first step sizes the initial update: eta = lr / (ratio x total training steps), with
    # total steps = rounds x clients_per_round x local_steps (the module docstring). 0.02: fed-sb's; LoRA-SB's GLUE
    # runs use 0.06.
    fed_sb_warmup_ratio: float = Field(0.02, gt=0, le=1, allow_inf_nan=False)


class FedSB(PrivateTerms, FederatedMethod):
    name = "fed_sb"
    changes_base_weights = True  # merges updates into W
    exact = True
    options_model = FedSBOptions
    rank_rule = CORE  # only the r x r core trains: r = floor(sqrt(N))

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self._estimating = False  # set by load_state: the global state has no bases yet
        self._grad_sums: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def lr(self) -> float:
        """The clients' learning rate; 0 in the estimation round, whose local steps only accumulate gradients."""
        return 0.0 if self._estimating else self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = value

    def initial_step(self) -> float:
        """eta of dW = -eta sign(sum of gradients): the first step of a linear warm-up over the run's training steps,
        lr / (warmup_ratio x rounds x clients_per_round x local_steps), at most lr (a warm-up of under one step
        is none)."""
        fed = self.config.federation
        total_steps = fed.rounds * fed.clients_per_round * fed.local_steps
        warmup_steps = max(1.0, self.options.fed_sb_warmup_ratio * total_steps)
        return self._lr / warmup_steps

    def scale(self, rank: int) -> float:
        alpha = self.config.method.lora_alpha
        return 1.0 if alpha is None else float(alpha) / rank

    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_layer(name: str, linear: nn.Linear) -> FrozenBasesLinear:
            rank = self.rank(self.config.method, linear.in_features, linear.out_features)
            self.ranks[name] = rank
            self.shapes[name] = (linear.out_features, linear.in_features)
            # The bases drawn here are placeholders until round 1's SVD replaces them; R stays 0 until then.
            bases = gaussian_bases(1, rank, linear.in_features, linear.out_features, layer_generator(self.seed, name),
                                   adapter_dtype(linear))
            return FrozenBasesLinear(linear, heads=1, rank=rank, bases=bases, scaling="constant")

        inject(model, self.config.model.target_modules, make_layer)
        return {name: module for name, module in model.named_modules() if isinstance(module, FrozenBasesLinear)}

    def resolved(self) -> dict:
        return {"rank": dict(self.ranks), "lora_scale": {n: self.scale(r) for n, r in self.ranks.items()},
                "initial_step": self.initial_step(), **layer_summary(self.config.method, self.shapes)}

    # ----------------------------------------------------------------- server
    def initial_state(self, model: nn.Module) -> State:
        state = super().initial_state(model)
        state[SYNCED_KEY] = initial_sync(self.config.federation.num_clients)
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        weights = self.client_weights(updates)
        new_state = {**state, **self.aggregate_head(updates, weights)}
        estimated = grad_key(next(iter(self.ranks))) in updates[0].tensors
        for layer, rank in self.ranks.items():
            if estimated:
                grad_sum = sum(u.tensors[grad_key(layer)].double() for u in updates)  # the pooled sum
                B, A, S = sign_update_bases(grad_sum, self.initial_step(), rank)
                dtype = updates[0].tensors[grad_key(layer)].dtype
                b_key, a_key = bases_keys(layer)
                new_state[b_key], new_state[a_key] = B.to(dtype), A.to(dtype)
                new_state[core_key(layer)] = (torch.diag(S) / self.scale(rank)).to(dtype)
            else:
                new_state[core_key(layer)] = weighted_mean([u.tensors[core_key(layer)] for u in updates], weights)
        new_state[SYNCED_KEY] = mark_synced(state, updates, round_index)
        return new_state

    def client_view(self, state: State, update: ClientUpdate) -> tuple[Optional[State], Optional[State]]:
        if grad_key(next(iter(self.ranks))) in update.tensors:
            return None, None  # the estimation round trains nothing: no client update to compare with
        return super().client_view(state, update)

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        """The head and R to every sampled client, and the bases to those that do not hold them yet (they were
        created at the end of round 1, so a client synchronised to round 1 or later has them)."""
        bases = state_bytes({k: v for k, v in state.items() if k.endswith(("/bases_B", "/bases_A"))})
        every = state_bytes({k: v for k, v in state.items() if k.startswith(HEAD_PREFIX) or k.endswith("/core")})
        return sum(every + (bases if synced_round(state, c) < INIT_ROUND else 0) for c in clients)

    # ----------------------------------------------------------------- client
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        self._remove_hooks()  # a task interrupted in this process may have left them
        super().load_state(model, state, client_state)
        layers = self.adapted_modules(model)
        self._estimating = bases_keys(next(iter(layers)))[0] not in state
        with torch.no_grad():
            for name, layer in layers.items():
                layer.scales.fill_(self.scale(layer.rank))
                if not self._estimating:
                    B, A = (state[key] for key in bases_keys(name))
                    layer.set_bases(B.unsqueeze(0), A.unsqueeze(0))
                    layer.cores.copy_(state[core_key(name)].unsqueeze(0))

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        layers = self.adapted_modules(model)
        if not self._estimating:
            meta = super().begin_training(model, task, batch_loss)
            for layer in layers.values():
                layer.cores.requires_grad_(True)
            return meta
        # Estimation round: the local steps run at learning rate 0 (``lr``); these hooks add up each step's
        # gradient of W, which the training loop clears before the next step.
        self._grad_sums = {name: torch.zeros_like(layer.base.weight, dtype=torch.float64)
                           for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.base.weight.requires_grad_(True)
            self._hooks.append(layer.base.weight.register_hook(accumulate_into(self._grad_sums[name])))
        return {"estimate": True}

    def before_private_steps(self, model: nn.Module) -> None:
        """Under DP-SGD the estimation round sums the private gradients (in after_private_noise), not the raw ones
        its hooks see, so the hooks go; and per-example gradients of W are taken at W's own nn.Linear: the forward
        must call it."""
        if self._estimating:
            self._remove_hooks()
            for layer in self.adapted_modules(model).values():
                layer.compute = "factorised"

    def after_private_noise(self, model: nn.Module) -> None:
        """Under DP-SGD the estimation round sums the clipped, noised gradients of W (what DP-SGD releases), not the
        raw ones the gradient hooks see."""
        if self._estimating:
            for name, layer in self.adapted_modules(model).items():
                self._grad_sums[name].add_(layer.base.weight.grad.detach().to(torch.float64))

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        if meta.get("estimate"):
            self._remove_hooks()
            for layer in self.adapted_modules(model).values():
                layer.compute = "auto"
            dtype = next(iter(self.adapted_modules(model).values())).base.weight.dtype
            return {grad_key(name): total.to(dtype) for name, total in self._grad_sums.items()}, None
        tensors, _ = super().upload(model, task, meta)
        for name, layer in self.adapted_modules(model).items():
            tensors[core_key(name)] = layer.cores.detach()[0].clone()
        return tensors, None

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
