"""Sample-level differential privacy: DP-SGD in each client's local training.

**Sample level** (``privacy.mode: sample``): DP-SGD (Abadi et al. 2016, arXiv 1607.00133, Algorithm 1) in local
training, as a hook on each of ``ModelHost``'s local steps (:class:`PrivateSteps`), through Opacus'
``GradSampleModule`` (per-example gradients; the adapter layers, which Opacus has no rule for and whose constant
buffers its functorch fallback refuses, get a registered rule that is that fallback with the buffers passed in:
:func:`adapter_grad_sample`) and ``DPOptimizer`` (per-example clipping to C, noise z C on the sum).

**The unit is the example.** The loss of a step is the mean over the batch of each example's own loss
(:meth:`ravan_ray.tasks.base.Task.example_loss`: for causal_lm and seq2seq the example's mean over its own target
tokens, not the batch's token mean, under which one example's gradient would depend on the others' token counts),
so a per-example gradient is that example's alone. Where one example makes several rows (a long QA context's
windows, ``TaskData.train_examples``), batches draw ``batch_size`` examples with all their rows, and an example's
gradient is the sum of its rows' gradients, clipped as one (:meth:`DPSGD.prepare_step`): the sampling rate, the clipping
and the accountant's unit are all the example (per-example clipping, not group privacy over the windows).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ravan_ray.config import ConfigError
from ravan_ray.methods.base import ClientTask, ClientUpdate, State
from ravan_ray.methods.private_terms import PrivateTerms
from ravan_ray.privacy.accounting import PerStepBudget, PrivacyBudget, plan_budget
from ravan_ray.privacy.mechanism import DifferentialPrivacy, StepHook

NOISE_STREAM = 4  # ClientTask.generator stream of DP-SGD's noise (no other draw uses it; FLoRA's fresh factors: 6)


class SampleLevel(DifferentialPrivacy):
    """``privacy.mode: sample``: every client's local steps are DP-SGD (:class:`DPSGD`); the server aggregates the
    uploads as they are and reports the clients' share of clipped examples."""

    name = "sample"
    per_example_gradients = True

    def plan_budget(self, client_sizes: Sequence[int],
                    sampled_rounds: Sequence[Sequence[int]]) -> Optional[PrivacyBudget]:
        privacy, fed = self.config.privacy, self.config.federation
        smallest = int(min(client_sizes))
        if privacy.delta >= 1.0 / smallest:
            raise ConfigError(f"privacy.delta ({privacy.delta:g}) must be < 1 / the smallest client's sample count "
                              f"({smallest}, so < {1.0 / smallest:g}): sample-level DP protects examples")
        rates = tuple(min(1.0, fed.batch_size / max(1, int(n))) for n in client_sizes)  # examples, not rows
        participation = tuple(tuple(int(r) for r in rounds) for rounds in sampled_rounds)
        return plan_budget(self.config, PerStepBudget(0.0, privacy.delta, rates, participation, fed.local_steps))

    def step_hook(self, model: torch.nn.Module, method: PrivateTerms, optimizer: torch.optim.Optimizer,
                  task: ClientTask, batches: list[torch.Tensor], examples: Optional[np.ndarray] = None) -> StepHook:
        """DP-SGD around the client's optimizer, without loss scaling; the upload carries the share of clipped
        examples. The noise is drawn from the client task's own stream, on the model's device. ``examples``: each
        row's example where one makes several rows (its rows' gradients are clipped together)."""
        privacy = self.config.privacy
        method.before_private_steps(model)
        # Opacus draws the noise on the parameters' device, so the generator lives there too
        device = next(p.device for p in model.parameters() if p.requires_grad)
        first = None if examples is None else row_groups(examples[batches[0].numpy()])
        batch_size = len(batches[0]) if first is None else int(first.max()) + 1  # examples per batch
        dp = DPSGD(model, optimizer, float(privacy.noise_multiplier), float(privacy.clip_norm), batch_size,
                   task.generator(stream=NOISE_STREAM, device=device),
                   after_noise=lambda: method.after_private_noise(model))
        return PrivateSteps(dp, examples)

    def privatize(self, method: PrivateTerms, state: State, updates: list[ClientUpdate],
                  round_index: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """The uploads as they are (DP-SGD made them private); the round's mean share of clipped examples."""
        return updates, {"clip_fraction": float(np.mean([u.meta["clip_fraction"] for u in updates])),
                         "clip_norm": self.config.privacy.clip_norm}


def row_groups(row_examples: np.ndarray) -> torch.Tensor:
    """Per row of a batch, the index (0, 1, ...) of its example among the batch's examples."""
    return torch.from_numpy(np.unique(row_examples, return_inverse=True)[1].reshape(-1).astype(np.int64))


def adapter_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-example gradients of an adapter layer's own trainable parameters (Ravan's cores and scales, LoRA's factors)
    for Opacus: ``vmap(grad(...))`` over the batch of the layer's functional forward, which is what Opacus' functorch
    fallback does, except that the layer's buffers go in as constants. Opacus refuses any layer with buffers there,
    because BatchNorm's running statistics are data; ours (the seeded frozen bases, the head and rank masks) are
    not, so this rule, registered for the two adapter classes, is the fallback without that refusal."""
    from torch.func import functional_call, grad, vmap

    trainable = {name: p for name, p in layer.named_parameters(recurse=False) if p.requires_grad}
    constants = {**{n: p.detach() for n, p in layer.named_parameters() if n not in trainable},
                 **dict(layer.named_buffers())}
    unhooked = without_hooks(layer)

    def example_loss(params, x, g):
        out = functional_call(unhooked, {**params, **constants}, (x.unsqueeze(0),))
        return (out * g.unsqueeze(0)).sum()

    x = activations[0]
    if x.dtype != backprops.dtype and x.is_floating_point():
        x = x.to(backprops.dtype)
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in trainable.items()}, x,
                                                                  backprops)
    return {trainable[name]: per_example[name] for name in trainable}


def without_hooks(layer: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``layer`` (same tensors, same settings) without Opacus' hooks, to run its forward inside
    the per-example gradient: the hooks would capture that inner call as if it were a training step. (Opacus' own
    fallback deep-copies the layer once; a copy made per call also sees settings that change between clients,
    such as a LoRA layer's scale.)"""
    from collections import OrderedDict

    clone = copy.copy(layer)
    clone._parameters, clone._buffers, clone._modules = (dict(layer._parameters), dict(layer._buffers),
                                                         dict(layer._modules))
    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                  "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
        setattr(clone, hooks, OrderedDict())
    return clone


def register_adapter_samplers(model: torch.nn.Module) -> None:
    """Give every adapter layer class in ``model`` (any :class:`~ravan_ray.adapters.AdapterLayer`: the shared layers
    and a method's own, such as Ravan's) the per-example gradient rule :func:`adapter_grad_sample`. Opacus looks rules
    up by a module's exact class, so each class in the model is registered, once."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    from ravan_ray.adapters import AdapterLayer

    new = {type(m) for m in model.modules() if isinstance(m, AdapterLayer)} - set(GradSampleModule.GRAD_SAMPLERS)
    if new:
        register_grad_sampler(sorted(new, key=lambda cls: cls.__qualname__))(adapter_grad_sample)


class PrivateSteps(StepHook):
    """DP-SGD's hook in a client's local steps: the loop steps Opacus' DPOptimizer, and before each step the rows'
    per-example gradients are summed per example (where one makes several rows) and the clipped ones counted."""

    def __init__(self, dp: "DPSGD", examples: Optional[np.ndarray]):
        super().__init__(dp.optimizer)
        self.dp, self.examples = dp, examples
        self.quiet = warnings.catch_warnings()

    def __enter__(self) -> "PrivateSteps":
        self.quiet.__enter__()
        # Opacus' backward hooks on a model whose inputs need no gradient (a frozen base): expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return self

    def before_step(self, rows: Optional[torch.Tensor]) -> None:
        self.dp.prepare_step(None if self.examples is None else row_groups(self.examples[rows.numpy()]))

    def meta(self) -> dict[str, Any]:
        return {"clip_fraction": self.dp.clip_fraction}

    def __exit__(self, *exc) -> bool:
        try:
            self.dp.close()
        finally:
            self.quiet.__exit__(*exc)
        return False


class DPSGD:
    """DP-SGD for one client task: Opacus' per-example gradients on ``model`` and its DPOptimizer around
    ``optimizer`` (per-example clipping to C, N(0, (z C)^2) on the sum, divided by the batch size). The noise comes
    from ``generator`` (the client task's own stream), so a resumed run is bit-identical. ``close()`` removes the
    hooks: the process's model serves the next client task."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 clip_norm: float, batch_size: int, generator: torch.Generator, after_noise=None):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        register_adapter_samplers(model)
        self.clip_norm = clip_norm
        # strict=False: the adapter layers' buffers are constants (see adapter_grad_sample), not data.
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                                     expected_batch_size=batch_size, loss_reduction="mean", generator=generator)
        if after_noise is not None:
            self.optimizer.attach_step_hook(lambda _optimizer: after_noise())
        self.examples = 0
        self.clipped = 0

    def prepare_step(self, groups: Optional[torch.Tensor] = None) -> None:
        """Count the examples whose gradient norm exceeds C (for clip_fraction); the optimizer's step then clips,
        noises and steps. ``groups``: per row, its example's index in the batch, where an example makes several rows:
        each example's gradient is then the sum of its rows' (the loss is the mean over rows, so Opacus' per-row
        gradient is the row's own), and that sum is what is clipped."""
        if groups is not None:
            self.sum_rows_per_example(groups)
        norms = [p.grad_sample.flatten(1).double().norm(dim=1) for p in self.optimizer.params
                 if getattr(p, "grad_sample", None) is not None]
        if norms:
            per_example = torch.stack(norms, dim=1).norm(dim=1)
            self.examples += int(per_example.numel())
            self.clipped += int((per_example > self.clip_norm).sum())

    def sum_rows_per_example(self, groups: torch.Tensor) -> None:
        count = int(groups.max()) + 1
        for p in self.optimizer.params:
            rows = getattr(p, "grad_sample", None)
            if isinstance(rows, list):  # several forward passes in the step: Opacus keeps one tensor per pass
                rows = torch.cat(rows)
            if rows is not None:
                index = groups.to(rows.device)
                p.grad_sample = rows.new_zeros((count, *rows.shape[1:])).index_add_(0, index, rows)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.examples if self.examples else math.nan

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
