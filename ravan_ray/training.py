"""One process's model: the pretrained network wrapped by the method, local training and evaluation.

:class:`ModelHost` is what a client actor and the parameter server hold; it knows nothing of Ray and
nothing of any particular method, task or privacy mechanism (it only calls their protocols), so it is tested
directly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ravan_ray.config import RunConfig
from ravan_ray.methods import build_method
from ravan_ray.methods.base import EVAL_PREFIX, ClientTask, ClientUpdate, FederatedMethod, State
from ravan_ray.models import FrozenWeights, ModelError, default_targets, model_from_weights
from ravan_ray.privacy import StepHook, build_mechanism
from ravan_ray.tasks import build_task
from ravan_ray.tasks.base import EXAMPLE_KEY, rows_in

Batch = dict[str, np.ndarray]  # a client's rows of the task's training arrays


@dataclass
class LocalClient:
    """One client's round in this process, from :meth:`ModelHost.prepare_client` to :meth:`ModelHost.finish_client`."""

    task: ClientTask
    method: FederatedMethod  # the client's own copy: begin_training may keep per-client settings on it
    meta: dict  # what begin_training chose (heads, ranks); the upload carries it
    data: Batch
    batches: list[torch.Tensor]  # the S local mini-batches: row indices into ``data``
    num_samples: int
    examples: Optional[np.ndarray] = None  # each row's example, where DP-SGD draws examples of several rows
    losses: list[torch.Tensor] = field(default_factory=list)  # each step's loss, on the device


def pick_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU share; with none, torch sees no GPU and we use CPU.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_optimizer(config: RunConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=opt.weight_decay)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Every dropout of the model at ``probability``: its nn.Dropout layers, and the probabilities attention modules
    keep as plain numbers and pass to the attention kernel (T5's ``dropout``, LLaMA's ``attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, probability)


def with_targets(config: RunConfig, model: nn.Module) -> RunConfig:
    """The config with ``model.target_modules`` resolved: an unset one becomes the model's own attention
    query and value projections (:func:`ravan_ray.models.default_targets`)."""
    if config.model.target_modules is not None:
        return config
    resolved = config.model_copy(deep=True)
    resolved.model.target_modules = default_targets(model)
    return resolved


def preflight(config: RunConfig, task_info: dict[str, Any]) -> dict:
    """Wrap the model's weightless skeleton with the method, in the driver, before Ray starts: no target
    module, a rank that does not fit, an unknown model are then one clear error, not an actor's traceback.
    Returns the method's resolved settings (ranks, target modules) for config.yaml."""
    skeleton = build_task(config, task_info).skeleton()
    config = with_targets(config, skeleton)
    method = build_method(config)
    mechanism = build_mechanism(config)
    mechanism.check(method)
    method.wrap_model(skeleton)
    if config.resources.cohort_size != 1:
        blocker = method.cohort_blocker or ("DP-SGD takes per-example gradients of one client's model"
                                            if mechanism.per_example_gradients else None)
        if blocker is not None:
            print(f"ravan-ray: {method.name} trains a round's clients one by one, not in cohorts ({blocker})",
                  file=sys.stderr)
    if method.ignores_compute_mix(config):
        print(f"ravan-ray: {method.name} does not read compute levels: every client trains its full budget whatever "
              f"compute.distribution={config.compute.distribution} gives it (summary.json: budget_aware false)",
              file=sys.stderr)
    return {**method.resolved(), "lr": method.lr, "target_modules": list(config.model.target_modules),
            "aggregation_weights": method.aggregation_weighting(config), "budget_aware": method.budget_aware}


class ModelHost:
    """``frozen``: build the model around these shared arrays (read zero-copy from Ray's object store)
    instead of loading a private copy. Only the parameters the method may change get private copies.

    Precision: with ``model.dtype`` bfloat16 / float16 the frozen base is stored in that dtype and every
    forward pass runs under autocast in it, while every parameter a client may change (adapters, task
    head, full fine-tuning's weights) is held in float32: they are averaged across clients, where half
    precision rounding would show, and Adam's updates on half-precision weights underflow."""

    def __init__(self, config: RunConfig, task_info: dict[str, Any], frozen: Optional[FrozenWeights] = None):
        self.task = build_task(config, task_info)
        if frozen is None:
            loaded = self.task.load_model()
        else:
            loaded = model_from_weights(self.task.skeleton(), frozen, config.model.name)
        self.config = config = with_targets(config, loaded.model)
        self.method = build_method(config)
        self.privacy = build_mechanism(config)  # differential privacy, if any: its hook changes the local steps
        self.model = loaded.model
        self.model.requires_grad_(False)
        # Plain attributes (not submodules): the method finds its layers and the head through them.
        object.__setattr__(self.model, "ravan_head_parameters", loaded.head_parameters)
        object.__setattr__(self.model, "ravan_adapted", self.method.wrap_model(self.model))
        self.model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        mutable = self.method.mutable_parameters(self.model)
        for name in mutable:
            # Private float32 copies: the shared pages are every process's pretrained weights (never
            # written), and what trains stays in float32 whatever the base's dtype.
            if frozen is not None or params[name].dtype != torch.float32:
                params[name].data = params[name].data.to(torch.promote_types(params[name].dtype, torch.float32),
                                                         copy=True)
        if config.model.gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ModelError(f"model.gradient_checkpointing: {type(self.model).__name__} does not support it")
            # Non-reentrant checkpointing works with a frozen base (no input needs a gradient).
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.model.dropout is not None:
            set_dropout(self.model, float(config.model.dropout))
        self.device = pick_device()
        self.model.to(self.device)
        params = dict(self.model.named_parameters())
        self.pristine = {n: params[n].detach().clone() for n in mutable}
        half = self.task.dtype
        self.autocast_dtype = None if half == torch.float32 else half
        # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none). DP-SGD
        # clips each example's gradient as it is: a scaled loss would scale the clipping bound, so it takes none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=half == torch.float16 and self.device.type == "cuda"
                                           and not self.privacy.per_example_gradients)

    @property
    def adapted(self) -> dict[str, nn.Module]:
        return self.model.ravan_adapted

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def initial_state(self) -> State:
        return {k: v.detach().cpu() for k, v in self.method.initial_state(self.model).items()}

    def load(self, state: State, client_state: Optional[State] = None) -> None:
        """Pretrained values for everything a client may have changed, then the given state on top."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.pristine.items():
                params[name].copy_(value)
        self.model.requires_grad_(False)
        self.method.load_state(self.model, state, client_state)

    # ----------------------------------------------------------------- client work
    def train_client(self, task: ClientTask, state: State, client_state: Optional[State], data: Batch) -> ClientUpdate:
        """One client's round, top to bottom: set the client up, S local steps, the upload. A privacy mechanism
        changes the steps through its hook (DP-SGD: each example's gradient clipped, noise on their sum), never the
        loop; a cohort (ravan_ray/cohort.py) builds its own loop of the same three parts."""
        client = self.prepare_client(task, state, client_state, data)
        optimizer = make_optimizer(self.config, [p for p in self.model.parameters() if p.requires_grad],
                                   client.method.lr)
        with self.privacy.step_hook(self.model, client.method, optimizer, task, client.batches,
                                    client.examples) as hook:
            for rows in client.batches:
                loss = self.step(hook.optimizer, lambda: self._loss(client.data, rows, client.method), hook, rows)
                client.losses.append(loss)
        return self.finish_client(client, hook.meta())

    def prepare_client(self, task: ClientTask, state: State, client_state: Optional[State], data: Batch) -> LocalClient:
        """A client ready for its local steps: the broadcast (and its own state) loaded, its S mini-batches drawn,
        and what it trains chosen by its own copy of the method (``begin_training``: heads, ranks). Every draw comes
        from the client task's own streams, so a client trains alike in any actor, alone or in a cohort."""
        cfg = self.config
        # eval/ keys are the server's, for evaluating the global model; they are not downlink, so a client
        # never sees them (a method's load_state may rely on that to tell a client from the global model).
        self.load({k: v for k, v in state.items() if not k.startswith(EVAL_PREFIX)}, client_state)
        num_samples = rows_in(data)
        torch.manual_seed(int(task.generator(stream=2).initial_seed()))  # dropout, identical in any actor
        # DP-SGD's unit is the example: where one makes several rows (QA windows), batches draw examples
        examples = data.get(EXAMPLE_KEY) if self.privacy.per_example_gradients else None
        steps = task.local_steps(cfg.federation.local_steps)
        if examples is None:
            batches = self._batch_order(num_samples, steps, cfg.federation.batch_size, task.generator(stream=0))
        else:
            batches = self._example_batches(examples, steps, cfg.federation.batch_size, task.generator(stream=0))
        scoring_rows = torch.randint(num_samples, (min(cfg.federation.batch_size, num_samples),),
                                     generator=task.generator(stream=3))
        self.model.train()
        method = copy.copy(self.method)  # begin_training may keep per-client settings on the method object
        meta = method.begin_training(self.model, task, lambda: self._loss(data, scoring_rows, method))
        return LocalClient(task, method, meta, data, batches, num_samples, examples)

    def step(self, optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor], hook: StepHook,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One local step: the loss, its gradient (scaled under float16), the hook's say on the gradients (DP-SGD's
        per-example clipping; a cohort's slices that a client does not train), the optimizer's step. Returns the
        loss, left on the device: a round's losses are read once, not once per step. ``rows``: the step's rows of
        the client's data, for the hook."""
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        self.scaler.scale(value).backward()
        hook.before_step(rows)
        self.scaler.step(optimizer)
        self.scaler.update()
        hook.after_step()
        return value.detach()

    def finish_client(self, client: LocalClient, meta: Optional[dict[str, Any]] = None) -> ClientUpdate:
        """The client's upload, built by its method from the trained model, and its mean loss over the steps.
        ``meta``: what the upload carries beside the method's own metadata (DP-SGD's share of clipped examples)."""
        if meta:
            client.meta = {**client.meta, **meta}
        self.model.eval()
        tensors, new_client_state = client.method.upload(self.model, client.task, client.meta)
        return ClientUpdate(
            client_id=client.task.client_id,
            tensors={k: v.detach().cpu() for k, v in tensors.items()},
            num_samples=client.num_samples,
            # one host sync for the whole round, not one per step
            train_loss=float(torch.stack(client.losses).double().mean()) if client.losses else math.nan,
            meta=client.meta,
            client_state=None if new_client_state is None else {k: v.detach().cpu() for k, v in new_client_state.items()},
        )

    @staticmethod
    def _batch_order(num_samples: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """S mini-batches walking through seeded permutations of the local data (epoch after epoch)."""
        batch_size = min(batch_size, num_samples)
        order = torch.cat([torch.randperm(num_samples, generator=generator)
                           for _ in range(math.ceil(steps * batch_size / num_samples))])
        return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]

    @classmethod
    def _example_batches(cls, examples: np.ndarray, steps: int, batch_size: int,
                         generator: torch.Generator) -> list[torch.Tensor]:
        """S mini-batches of ``batch_size`` examples (seeded permutations of the client's examples, as
        :meth:`_batch_order` walks rows), each the rows those examples made; ``examples``: each row's example."""
        _, local = np.unique(examples, return_inverse=True)
        return [torch.from_numpy(np.flatnonzero(np.isin(local, chosen.numpy())))
                for chosen in cls._batch_order(int(local.max()) + 1, steps, batch_size, generator)]

    def _loss(self, data: Batch, rows: torch.Tensor, method: Optional[FederatedMethod] = None) -> torch.Tensor:
        """What a local step minimises: the task's loss on these rows plus the penalty of ``method`` (the client's
        copy; default the host's), if it has one (a method has one only while a client trains: between its
        begin_training and its upload). Under DP-SGD the task's loss of each example alone, averaged
        (:meth:`Task.example_loss`)."""
        task_loss = self.task.example_loss if self.privacy.per_example_gradients else self.task.loss
        with self.autocast():
            loss = task_loss(self.model, self.task.batch(data, rows.numpy(), self.device))
            penalty = (method or self.method).local_penalty(self.model)
            return loss if penalty is None else loss + penalty

    # ----------------------------------------------------------------- global model
    @torch.no_grad()
    def evaluate(self, state: State, data: dict[str, Any], batch_size: int) -> dict[str, float]:
        self.load(state)
        self.model.eval()
        with self.autocast():
            return self.task.evaluate(self.model, data, batch_size, self.device)

    @torch.no_grad()
    def layer_deltas(self, state: State, client_state: Optional[State] = None) -> dict[str, torch.Tensor]:
        """ΔW = (weight the layer applies) - (pretrained weight), per adapted layer, under ``state``, in
        float64: the change of the layer's own weight (where the method changes it) plus the adapter's
        delta, each computed on its own so that a half-precision base does not round the update away."""
        self.load(state, client_state)
        params = dict(self.model.named_parameters())
        deltas = {}
        for name, module in self.adapted.items():
            weight_name = f"{name}.base.weight" if hasattr(module, "base") else f"{name}.weight"
            weight = params[weight_name]
            delta = torch.zeros(weight.shape, dtype=torch.float64)
            if weight_name in self.pristine:
                delta += (weight.detach().double() - self.pristine[weight_name].double()).cpu()
            if hasattr(module, "delta_weight"):
                delta += module.delta_weight().detach().double().cpu()
            deltas[name] = delta
        return deltas
